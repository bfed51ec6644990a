"""Driving futures recorded from highway-env (PyPI `highway-env`, Farama Foundation): IDM car
following and MOBIL lane changes on 2-4 lane highways and on a highway with an on-ramp merge.
A validation source this project did not write (its traffic model is highway-env's own).

Every vehicle of the traffic is recorded at 10 Hz; a scene is one vehicle at one moment t0
(every 1.5 s of its drive, after the first second): the last 10 poses up to t0 and the next 64
(6.4 s), in that vehicle's frame at t0 (origin at its position, x along its heading, y to the
side), as `flow-matching traj-to-actions` reads them. The condition is what the vehicle sees
at t0, 6 numbers:

| # | feature |
| -: | --- |
| 0 | (speed - 25) / 5, m/s |
| 1 | +1 if a lane exists on one side (highway-env's lane index - 1), else -1 |
| 2 | +1 if a lane exists on the other side (lane index + 1), else -1 |
| 3 | (min(gap to the vehicle ahead in its lane, 80) - 40) / 20, m (no vehicle ahead: 80) |
| 4 | (speed of the vehicle ahead - speed) / 5, m/s (no vehicle ahead: 0) |
| 5 | (min(metres to the end of the on-ramp's merging lane, 200) - 100) / 50 (elsewhere 200) |

There is no oracle (the traffic's future given one moment cannot be redrawn), so models are
judged against constant velocity and the regression baseline. Usage:

    python scripts/validation/highway_env_scenes.py OUT_DIR [--train 20000] [--test 500] [--seed 0]

writes OUT_DIR/{train,test}/{hist_xyz,hist_yaw,fut_xyz,fut_yaw,cond}.npy. Train and test come
from different episodes (seeds). Needs numpy, gymnasium and highway-env.
"""

import argparse
import os
import sys
import warnings

import numpy as np

HIST, FUT, DT = 10, 64, 0.1
STRIDE = 15  # steps between two scenes of one vehicle (1.5 s)
# merge-v0's on-ramp, in driving order: the last lane ends where the ramp joins the highway.
RAMP = [("j", "k", 0), ("k", "b", 0), ("b", "c", 2)]


def make_env(kind, rng):
    import gymnasium as gym
    import highway_env  # noqa: F401  (registers the environments)

    if kind == "highway":
        cfg = {
            "lanes_count": int(rng.integers(2, 5)),
            "vehicles_count": 40,
            "vehicles_density": float(rng.uniform(0.8, 1.6)),
            "simulation_frequency": 10,
            "policy_frequency": 10,
        }
        env = gym.make("highway-v0", config=cfg)
    else:
        env = gym.make("merge-v0", config={"simulation_frequency": 10, "policy_frequency": 10})
    return env


def add_merge_traffic(env, rng):
    """merge-v0 places a handful of cars; more on both lanes and on the ramp make merges busy."""
    from highway_env.vehicle.behavior import IDMVehicle

    road = env.unwrapped.road
    for _ in range(14):
        lane = ("a", "b", int(rng.integers(0, 2)))
        x = float(rng.uniform(0, 220))
        v = IDMVehicle(road, road.network.get_lane(lane).position(x, 0), speed=float(rng.uniform(20, 30)))
        v.lane_index = lane
        v.lane = road.network.get_lane(lane)
        v.target_lane_index = lane
        v.plan_route_to("d")
        v.randomize_behavior()
        road.vehicles.append(v)
    for _ in range(3):
        lane = ("j", "k", 0)
        x = float(rng.uniform(0, 120))
        v = IDMVehicle(road, road.network.get_lane(lane).position(x, 0), speed=float(rng.uniform(15, 25)))
        v.lane_index = lane
        v.lane = road.network.get_lane(lane)
        v.target_lane_index = lane
        v.plan_route_to("d")
        v.randomize_behavior()
        road.vehicles.append(v)
    # Cars spawned on top of each other would crash at once: keep the first of any close pair.
    kept = []
    for v in road.vehicles:
        if all(np.linalg.norm(v.position - k.position) > 12 for k in kept):
            kept.append(v)
    road.vehicles[:] = kept


def observe(road, v):
    """The 6-number condition of vehicle `v` now."""
    side = road.network.side_lanes(v.lane_index)
    _, _, idx = v.lane_index
    left = any(s[2] == idx - 1 for s in side)
    right = any(s[2] == idx + 1 for s in side)
    front, _ = road.neighbour_vehicles(v, v.lane_index)
    if front is None:
        gap, dv = 80.0, 0.0
    else:
        gap = float(v.lane_distance_to(front)) - v.LENGTH
        dv = float(front.speed - v.speed)
    left_in_lane = 200.0
    if v.lane_index in RAMP:
        # On merge-v0's on-ramp: the metres to the end of its merging lane.
        i = RAMP.index(v.lane_index)
        lane = road.network.get_lane(v.lane_index)
        s, _ = lane.local_coordinates(v.position)
        rest = sum(road.network.get_lane(l).length for l in RAMP[i + 1 :])
        left_in_lane = max(float(lane.length - s) + rest, 0.0)
    return [
        (v.speed - 25.0) / 5.0,
        1.0 if left else -1.0,
        1.0 if right else -1.0,
        (min(max(gap, 0.0), 80.0) - 40.0) / 20.0,
        dv / 5.0,
        (min(left_in_lane, 200.0) - 100.0) / 50.0,
    ]


def episode(kind, seed, steps):
    """Runs one episode; returns per vehicle its poses [T, 3] (x, y, yaw) and conditions [T, 6]."""
    rng = np.random.default_rng(seed)
    env = make_env(kind, rng)
    env.reset(seed=int(seed))
    if kind == "merge":
        add_merge_traffic(env, rng)
    road = env.unwrapped.road
    ego = env.unwrapped.vehicle
    tracks = {id(v): ([], [], v) for v in road.vehicles if v is not ego}
    alive = {k: True for k in tracks}
    for _ in range(steps):
        for k, (poses, conds, v) in tracks.items():
            if not alive[k]:
                continue
            if v.crashed or v not in road.vehicles:
                alive[k] = False
                continue
            poses.append((float(v.position[0]), float(v.position[1]), float(v.heading)))
            conds.append(observe(road, v))
        road.act()
        road.step(DT)
    env.close()
    return [(np.array(p), np.array(c)) for p, c, _ in tracks.values() if len(p) > HIST + FUT]


def windows(poses, conds):
    """Every STRIDE steps: the history, the future (in the frame at t0) and the condition."""
    out = []
    for t0 in range(HIST - 1, len(poses) - FUT, STRIDE):
        x0, y0, h0 = poses[t0]
        c, s = np.cos(h0), np.sin(h0)
        seg = poses[t0 - HIST + 1 : t0 + FUT + 1]
        dx, dy = seg[:, 0] - x0, seg[:, 1] - y0
        local = np.stack([c * dx + s * dy, -s * dx + c * dy, np.zeros_like(dx)], -1)
        yaw = np.unwrap(seg[:, 2]) - h0
        out.append((local[:HIST], yaw[:HIST], local[HIST:], yaw[HIST:], conds[t0]))
    return out


def collect(n, seed0, steps):
    scenes, ep = [], 0
    while len(scenes) < n:
        kind = "merge" if ep % 4 == 3 else "highway"
        for p, c in episode(kind, seed0 + ep, steps):
            scenes.extend(windows(p, c))
        ep += 1
        print(f"  episode {ep} ({kind}): {len(scenes)} scenes", file=sys.stderr)
    rng = np.random.default_rng(seed0)
    pick = rng.permutation(len(scenes))[:n]
    return [scenes[i] for i in pick], ep


def save(out, scenes):
    os.makedirs(out, exist_ok=True)
    names = ["hist_xyz", "hist_yaw", "fut_xyz", "fut_yaw"]
    for i, name in enumerate(names):
        np.save(os.path.join(out, name + ".npy"), np.stack([s[i] for s in scenes]).astype(np.float64))
    np.save(os.path.join(out, "cond.npy"), np.stack([s[4] for s in scenes]).astype(np.float32))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800, help="simulation steps per episode (0.1 s)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    train, ep = collect(a.train, a.seed * 1000, a.steps)
    # Test scenes come from episodes the training set never saw.
    test, _ = collect(a.test, a.seed * 1000 + 500, a.steps)
    save(os.path.join(a.out, "train"), train)
    save(os.path.join(a.out, "test"), test)
    print(f"wrote {len(train)} training scenes ({ep} episodes) and {len(test)} test scenes to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
