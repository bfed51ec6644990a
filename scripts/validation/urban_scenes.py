#!/usr/bin/env python3
"""Synthetic urban driving futures for validating a trajectory-prediction model.

Independent generator (numpy only).  An ego car drives at 10 Hz (dt = 0.1 s).
A *scene* is the situation at t0; its *future* is the ego's next 6.4 s (64 poses).

Scene types (equal shares, randomised geometry):
  0 crosswalk   : zebra crossing 8-40 m ahead, pedestrian at distance p to the kerb
                  (p < 0: already on the carriageway / crossing).  Hidden choice:
                  YIELD (smooth stop before the crossing, wait 1-4 s, reaction,
                  pull away) or PASS at reduced speed.  P(yield) depends on p.
  1 obstacle    : stopped vehicle 15-50 m ahead in the ego lane, oncoming traffic
                  time gap g.  Hidden choice: SWERVE now (lateral shift 2.5-3.5 m to
                  the left and back), WAIT-then-swerve (stop behind it 1-3 s first),
                  or STOP behind it (and stay).  Probabilities depend on g.
  2 roundabout  : radius R 12-20 m, entry point (where the entry curve meets the
                  circulating lane) 13.5-30 m ahead (lower bound = 7 m + the 7-10 m
                  extent of the entry curve, so the curve starts 7-22 m ahead); counter-
                  clockwise (right-hand traffic).  Hidden choices: exit 1/2/3
                  (right / straight / left: ~90/180/270 deg around) and whether it
                  must YIELD at the entry (p = 0.35, stop 0-3 s).  Exit probabilities
                  0.30 / 0.45 / 0.25.  Note: at roundabout speeds (4-8 m/s) the exits
                  only separate in the 6.4 s horizon when the entry is near.
  3 free road   : speed-limit change (new posted limit) or a traffic-calming hump
                  (visible sub-type).  The driver changes speed with personal
                  comfort 1-3 m/s^2, personal target speed and reaction time.
All futures carry driver noise: smooth lateral wobble (< 0.2 m), reaction delays
0.2-1.0 s, comfort deceleration 1.5-4 m/s^2 (1-3 on free road), comfort
acceleration 1-3 m/s^2.

Motion: kinematic unicycle integrated at 20 Hz (speed >= 0, acceleration in
[-6, 3] m/s^2 with a first-order actuator lag, |curvature| <= 0.2 1/m with a rate
limit, yaw rate = v * curvature so a stopped car keeps its heading), steered by
pure pursuit onto the intended path (a curvature-profile path on a 0.25 m grid).
The history (2 s simulated, last 10 poses kept) is driven on the common straight
approach with a small constant acceleration a_h in [-0.5, 0.5] m/s^2 and ends
with speed v0 at t0; the future starts from exactly that state.

Condition  cond[:, j]  (float32, what the ego knows at t0; no hidden choices):
  0  speed at t0:                (v0 - 8) / 3.5                    [v0 in m/s]
  1  scene type code:            (k - 1.5) / 1.118, k = 0 crosswalk, 1 obstacle,
                                 2 roundabout, 3 free road  (-1.34,-0.45,0.45,1.34)
  2  distance along x (t0 frame) from the ego to the relevant feature:
                                 (d - 25) / 12   [crosswalk centre line; rear of
                                 the stopped vehicle; roundabout entry point
                                 (where the entry curve meets the circulating
                                 lane; the curve / yield line starts 7-10 m
                                 before it); speed sign / hump]
  3  pedestrian distance to the kerb (crosswalk only): (p - 1.25) / 2.75,
                                 p in [-3.5, 6] m (negative = on the road);
                                 other types: 3.0 ("far/absent", p ~ 9.5 m)
  4  roundabout: radius (R - 16) / 2.3;  free road: +1 hump, -1 limit change;
                                 crosswalk / obstacle: 0
  5  obstacle: oncoming time gap (g - 7) / 4.5, g in [0, 12] s, or g = 15
                                 (no oncoming car, 25 % of obstacle scenes);
                                 free road: posted speed after the event
                                 (v_post - 8) / 3.5 (hump: advisory 3 m/s);
                                 crosswalk / roundabout: 0

Outputs (np.save; float64 unless said), frame = ego pose at t0 (origin, heading
0 along +x, +y left):
  OUT/train/, OUT/test/ : hist_xyz [N,10,3] (t0-0.9..t0, last = 0), hist_yaw [N,10],
                          fut_xyz [N,64,3] (t0+0.1..t0+6.4), fut_yaw [N,64]
                          (unwrapped, relative to t0 heading), cond [N,6] float32
  OUT/test/oracle_fut_xyz [N*6,64,3], oracle_fut_yaw [N*6,64]: 6 fresh futures per
                          test scene (same scene geometry and t0 state, new hidden
                          choices and driver noise), scene-major.

Usage: python urban_scenes.py OUT_DIR [--train 20000] [--test 500] [--seed 0]
       [--no-report]
Deterministic given the seed (train and test use independent child seeds).
"""
import argparse
import os
import time

import numpy as np

DT_OUT = 0.1
SUB = 2
DT = DT_OUT / SUB
N_HIST_SIM = 20          # simulate 2 s of history, keep the last 10 poses
N_HIST = 10
N_FUT = 64
K_ORACLE = 6

S0, DS, S_MAX = -40.0, 0.25, 190.0
SG = S0 + DS * np.arange(int(round((S_MAX - S0) / DS)) + 1)
M = SG.size

KAP_MAX = 0.2
DKAP_MAX = 0.35          # 1/m/s, steering rate limit
TAU_KAP = 0.15
TAU_A = 0.25
A_MAX, B_MAX = 3.0, 6.0
K_V = 1.0
CY_RB = 1.75             # roundabout centre is 1.75 m left of the ego lane
TYPE_NAMES = ["crosswalk", "obstacle", "roundabout", "free"]

# table to invert lateral shift of a sin^2 heading profile: A/L = f(theta_m)
_TM = np.linspace(0.0, 1.3, 1301)
_U = (np.arange(400) + 0.5) / 400
_FTM = np.sin(_TM[:, None] * np.sin(np.pi * _U[None, :]) ** 2).mean(1)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rb_geometry(R):
    """Entry fillet radius rf, tangency angle delta, fillet turn alpha for radius R."""
    rf = 5.0 + 0.3 * R
    delta = np.arcsin((rf + CY_RB) / (R + rf))
    return rf, delta, np.pi / 2 - delta


def _rb_entry_offset(R):
    rf, _, alpha = _rb_geometry(R)
    return rf * np.sin(alpha)


def _vmax_stop(dist, b=5.0, react=1.0):
    """Largest speed that can still stop within dist with reaction + braking b."""
    dist = np.maximum(dist, 0.5)
    return -b * react + np.sqrt((b * react) ** 2 + 2.0 * b * dist)


# ----------------------------------------------------------------------------
# scene (visible geometry) sampling
# ----------------------------------------------------------------------------
def sample_scenes(rng, n):
    g = {}
    k = rng.integers(0, 4, n)
    g["type"] = k
    d = np.zeros(n)
    v0 = np.zeros(n)
    u = rng.random(n)
    # crosswalk
    m = k == 0
    d[m] = rng.uniform(8, 40, m.sum())
    # obstacle
    m1 = k == 1
    d[m1] = rng.uniform(15, 50, m1.sum())
    # roundabout
    m2 = k == 2
    Rr = rng.uniform(12, 20, n)
    xf_off = _rb_entry_offset(Rr)          # entry curve starts this far before the entry point
    dmin = np.maximum(10.0, xf_off + 7.0)
    d[m2] = (dmin + (30.0 - dmin) * rng.random(n) ** 1.5)[m2]   # nearer entries a bit more often
    # free road
    m3 = k == 3
    d[m3] = rng.uniform(10, 60, m3.sum())
    hump = m3 & (rng.random(n) < 1.0 / 3.0)
    g["hump"] = hump
    # feasibility of a comfortable-ish stop bounds the speed near stop features
    vmax = np.full(n, 14.0)
    vmax[m] = _vmax_stop(d[m] - 3.5 - 1.0)
    vmax[m1] = _vmax_stop(d[m1] - 9.0 - 1.0)
    vmax[m2] = np.minimum(10.0, _vmax_stop(d[m2] - xf_off[m2] - 2.0 - 1.0))
    vmax[hump] = _vmax_stop(d[hump] - 1.0 - 1.0, b=4.0)
    vmax = np.clip(vmax, 3.0, 14.0)
    v0 = 3.0 + u * (vmax - 3.0)
    g["v0"] = v0
    g["d"] = d
    g["a_h"] = rng.uniform(-0.5, 0.5, n)
    g["ped"] = np.where(m, rng.uniform(-3.5, 6.0, n), np.nan)
    gap = np.where(rng.random(n) < 0.25, 15.0, rng.uniform(0, 12, n))
    g["gap"] = np.where(m1, gap, np.nan)
    g["R"] = np.where(m2, Rr, np.nan)
    # posted speed after a limit change, at least 2 m/s away from v0
    vp = rng.uniform(3, 14, n)
    for _ in range(20):
        bad = np.abs(vp - v0) < 2.0
        if not bad.any():
            break
        vp[bad] = rng.uniform(3, 14, bad.sum())
    vp = np.where(np.abs(vp - v0) < 2.0, np.where(v0 > 8, v0 - 2.5, v0 + 2.5), vp)
    g["vpost"] = np.where(m3, np.where(hump, 3.0, vp), np.nan)
    return g


def repeat_scenes(g, r):
    return {key: np.repeat(val, r, axis=0) for key, val in g.items()}


# ----------------------------------------------------------------------------
# hidden choices + driver parameters -> path and longitudinal plan
# ----------------------------------------------------------------------------
def sample_driver(rng, g):
    n = g["type"].size
    k = g["type"]
    v0 = g["v0"]
    d = g["d"]
    INF = np.inf
    p = {}
    p["t_r"] = rng.uniform(0.2, 1.0, n)
    p["t_r2"] = rng.uniform(0.2, 1.0, n)
    p["b"] = np.where(k == 3, rng.uniform(1.0, 3.0, n), rng.uniform(1.5, 4.0, n))
    p["a_c"] = rng.uniform(1.0, 3.0, n)
    p["w_amp"] = rng.uniform(0.0, 0.05, (n, 3))
    p["w_f"] = 1.0 / rng.uniform(30.0, 150.0, (n, 3))       # 1/wavelength (1/m)
    p["w_ph"] = rng.uniform(0, 2 * np.pi, (n, 3))
    za = np.full(n, INF)
    zb = np.full(n, INF)
    vz = np.full(n, INF)
    stop_s = np.full(n, INF)
    wait = np.full(n, INF)
    v_after = np.clip(v0 * rng.uniform(0.95, 1.15, n), 3.0, 14.0)
    s_sw = np.zeros(n)
    kap = np.zeros((n, M))
    choice = np.full(n, -1)           # per-type hidden discrete choice
    choice2 = np.full(n, -1)          # roundabout: yield flag
    sg = SG[None, :]

    # --- crosswalk --------------------------------------------------------
    m = k == 0
    if m.any():
        ped = g["ped"]
        py = np.where(ped < 0, 0.97, 0.05 + 0.9 * _sig((2.0 - np.nan_to_num(ped)) / 0.8))
        y = rng.random(n) < py
        yl = m & y
        ps = m & ~y
        choice[m] = np.where(y[m], 0, 1)       # 0 yield, 1 pass
        stop_s[yl] = d[yl] - rng.uniform(1.5, 3.5, yl.sum())
        wait[yl] = rng.uniform(1.0, 4.0, yl.sum())
        za[ps] = d[ps] - 6.0
        zb[ps] = d[ps] + 4.0
        vz[ps] = np.maximum(3.0, v0[ps] * rng.uniform(0.5, 0.8, ps.sum()))
        s_sw[m] = d[m]
    # --- obstacle -----------------------------------------------------------
    m = k == 1
    if m.any():
        gp = np.nan_to_num(g["gap"])
        p_stop = 0.15 + 0.25 * _sig((2.5 - gp) / 1.0)
        p_wait = (1 - p_stop) * _sig((6.0 - gp) / 1.5)
        u = rng.random(n)
        c = np.where(u < p_stop, 2, np.where(u < p_stop + p_wait, 1, 0))  # 0 now,1 wait,2 stop
        choice[m] = c[m]
        A = rng.uniform(2.5, 3.5, n)
        L_in = np.minimum(rng.uniform(12, 18, n), d - 3.0)
        L_out = rng.uniform(12, 20, n)
        s1 = d - L_in
        s2 = d + 5.0 + rng.uniform(2.0, 4.0, n)       # end of hold (obstacle length 5 m)
        s3 = s2 + L_out
        tm_in = np.interp(A / L_in, _FTM, _TM)
        tm_out = np.interp(A / L_out, _FTM, _TM)
        sw = m & (c < 2)
        uin = (sg - s1[:, None]) / L_in[:, None]
        uout = (sg - s2[:, None]) / L_out[:, None]
        kin = np.where((uin >= 0) & (uin <= 1),
                       tm_in[:, None] * np.pi / L_in[:, None] * np.sin(2 * np.pi * uin), 0.0)
        kout = np.where((uout >= 0) & (uout <= 1),
                        -tm_out[:, None] * np.pi / L_out[:, None] * np.sin(2 * np.pi * uout), 0.0)
        kap[sw] = (kin + kout)[sw]
        za[sw] = s1[sw]
        zb[sw] = s3[sw]
        vz[sw] = np.minimum(v0[sw], rng.uniform(5.0, 9.0, sw.sum()))
        s_sw[m] = s3[m]
        wt = m & (c == 1)
        st = m & (c == 2)
        p["x_stop"] = np.where(wt, d - rng.uniform(6.0, 9.0, n),
                               np.where(st, d - rng.uniform(5.0, 8.0, n), np.nan))
        wait[wt] = rng.uniform(1.0, 3.0, wt.sum())
        wait[st] = INF
    else:
        p["x_stop"] = np.full(n, np.nan)
    # --- roundabout --------------------------------------------------------
    m = k == 2
    if m.any():
        R = np.nan_to_num(g["R"], nan=16.0)
        rf, delta, alpha = _rb_geometry(R)
        xf = d - rf * np.sin(alpha)          # d = entry point on the circle (x), xf = start of entry curve
        u = rng.random(n)
        ex = np.where(u < 0.3, 1, np.where(u < 0.75, 2, 3))
        beta = np.pi / 2 - 2 * delta + (ex - 1) * np.pi / 2
        sa = xf
        sb = sa + rf * alpha
        sc = sb + R * beta
        se = sc + rf * alpha
        S = sg
        kr = np.where((S >= sa[:, None]) & (S < sb[:, None]), -1.0 / rf[:, None], 0.0)
        kr = np.where((S >= sb[:, None]) & (S < sc[:, None]), 1.0 / R[:, None], kr)
        kr = np.where((S >= sc[:, None]) & (S < se[:, None]), -1.0 / rf[:, None], kr)
        kap[m] = kr[m]
        choice[m] = ex[m]
        yv = rng.random(n) < 0.35
        choice2[m] = yv[m].astype(int)
        ym = m & yv
        stop_s[ym] = xf[ym] - rng.uniform(0.5, 2.0, ym.sum())
        wait[ym] = rng.uniform(0.0, 3.0, ym.sum())
        za[m] = xf[m] - 2.0
        zb[m] = se[m]
        vz[m] = np.clip(np.sqrt(rng.uniform(2.0, 3.0, n) * R), 3.0, 8.0)[m]
        v_after[m] = rng.uniform(7.0, 11.0, m.sum())
        s_sw[m] = se[m]
    # --- free road ------------------------------------------------------------
    m = k == 3
    if m.any():
        hump = g["hump"]
        vp = np.nan_to_num(g["vpost"], nan=8.0)
        hm = m & hump
        lm = m & ~hump
        za[hm] = d[hm] - 1.0
        zb[hm] = d[hm] + 4.0
        vz[hm] = rng.uniform(2.0, 4.5, hm.sum())
        v_after[hm] = np.clip(v0[hm] * rng.uniform(0.95, 1.1, hm.sum()), 3.0, 14.5)
        s_sw[hm] = d[hm] + 4.0
        vt = np.clip(vp * rng.uniform(0.92, 1.08, n), 2.5, 15.0)
        dec = lm & (vt < v0)
        acc = lm & ~(vt < v0)
        za[dec] = d[dec]
        zb[dec] = 1e9
        vz[dec] = vt[dec]
        v_after[lm] = vt[lm]
        s_sw[dec] = d[dec]
        s_sw[acc] = d[acc] + rng.uniform(0.0, 5.0, acc.sum())
        choice[m] = np.where(hump, 2, np.where(vt < v0, 1, 0))[m]   # 0 up, 1 down, 2 hump
        p["v_tgt"] = np.where(hm, vz, np.where(lm, vt, np.nan))
    # smooth curvature (3 m box) -> path
    w = 12
    cs = np.cumsum(np.pad(kap, ((0, 0), (w // 2, w - w // 2)), mode="edge"), axis=1)
    kap = (cs[:, w:] - cs[:, :-w]) / w
    kap = kap[:, :M] if kap.shape[1] >= M else np.pad(kap, ((0, 0), (0, M - kap.shape[1])), mode="edge")
    th = np.concatenate([np.zeros((n, 1)), np.cumsum(kap[:, :-1] * DS, axis=1)], axis=1)
    thm = th + 0.5 * kap * DS
    px = S0 + np.concatenate([np.zeros((n, 1)), np.cumsum(np.cos(thm[:, :-1]) * DS, axis=1)], axis=1)
    py_ = np.concatenate([np.zeros((n, 1)), np.cumsum(np.sin(thm[:, :-1]) * DS, axis=1)], axis=1)
    # obstacle stop points given as x positions -> arc length on the path
    mo = np.isfinite(p["x_stop"])
    if mo.any():
        idx = np.argmax(px[mo] >= p["x_stop"][mo][:, None], axis=1)
        stop_s[mo] = SG[idx]
    p.update(dict(za=za, zb=zb, vz=vz, stop_s=stop_s, wait=wait, v_after=v_after,
                  s_sw=s_sw, choice=choice, choice2=choice2))
    path = dict(x=px, y=py_, th=th)
    return p, path


def straight_path(n):
    x = np.broadcast_to(SG, (n, M)).copy()
    return dict(x=x, y=np.zeros((n, M)), th=np.zeros((n, M)))


def wobble(amp, f, ph, s):
    """Smooth lateral wobble as a function of travelled arc length s (m)."""
    return (amp * np.sin(2 * np.pi * f * s[..., None] + ph)).sum(-1)


# ----------------------------------------------------------------------------
# simulation
# ----------------------------------------------------------------------------
def simulate(path, st, prm, t_start, n_out, hist):
    """Integrate n_out*SUB substeps from t_start; returns poses at each 0.1 s."""
    n = st["x"].size
    ar = np.arange(n)
    win = np.arange(-4, 13)
    PX, PY, TH = path["x"], path["y"], path["th"]
    x, y, psi, v, a, kap, idx = (st[key].copy() for key in ("x", "y", "psi", "v", "a", "kap", "idx"))
    t_stop = np.full(n, np.nan)
    released = np.zeros(n, bool)
    eng2 = np.zeros(n, bool)          # latched: braking for the speed zone has begun
    eng3 = np.zeros(n, bool)          # latched: braking for the stop line has begun
    out = np.zeros((n, n_out, 3))
    vout = np.zeros((n, n_out))
    t = t_start
    for i in range(n_out):
        for _ in range(SUB):
            cand = np.clip(idx[:, None] + win[None, :], 0, M - 1)
            d2 = (PX[ar[:, None], cand] - x[:, None]) ** 2 + (PY[ar[:, None], cand] - y[:, None]) ** 2
            idx = cand[ar, np.argmin(d2, axis=1)]
            thi = TH[ar, idx]
            s = SG[idx] + (x - PX[ar, idx]) * np.cos(thi) + (y - PY[ar, idx]) * np.sin(thi)
            # --- lateral: pure pursuit onto the (wobbled) path
            Ld = np.clip(3.0 + 0.5 * v, 4.0, 10.0)
            j = np.clip(idx + np.round(Ld / DS).astype(int), 0, M - 1)
            if hist:
                w = wobble(prm["hw_amp"], prm["hw_f"], prm["hw_ph"], s)
            else:
                w = (wobble(prm["w_amp"], prm["w_f"], prm["w_ph"], s)
                     + prm["w_off"] * np.exp(-np.maximum(s - prm["s0"], 0.0) / 15.0))
            thj = TH[ar, j]
            tx = PX[ar, j] - np.sin(thj) * w - x
            ty = PY[ar, j] + np.cos(thj) * w - y
            ly = -np.sin(psi) * tx + np.cos(psi) * ty
            kc = 2.0 * ly / np.maximum(tx * tx + ty * ty, 1e-6)
            dk = np.clip((kc - kap) * min(1.0, DT / TAU_KAP), -DKAP_MAX * DT, DKAP_MAX * DT)
            kap = np.clip(kap + dk, -KAP_MAX, KAP_MAX)
            # --- longitudinal
            if hist:
                ac = prm["a_h"] + K_V * (prm["v0"] + prm["a_h"] * t - v)
            else:
                b = prm["b"]
                vcr = np.where(s < prm["s_sw"], prm["v0"], prm["v_after"])
                a1 = np.clip(K_V * (vcr - v), -b, prm["a_c"])
                za, zb, vz = prm["za"], prm["zb"], prm["vz"]
                pre = s < za
                # speed zones: comfortable preview braking (capped at 1.5 b; a driver
                # who cannot make it in time keeps slowing inside the zone)
                req2 = (v * v - np.minimum(vz, 50) ** 2) / (2 * np.maximum(za - s, 0.5))
                on_t = t >= prm["t_r"]
                eng2 = eng2 | (on_t & pre & (v > vz) & (req2 > 0.6 * b))
                a2 = np.where(eng2 & pre & (v > vz), -np.minimum(req2, 1.5 * b), np.inf)
                inz = (s >= za) & (s <= zb)
                a2 = np.where(inz, np.clip(K_V * (vz - v), -1.5 * b, prm["a_c"]), a2)
                # stop line: constant-deceleration law aimed 0.3 m short of the line,
                # with a soft final phase (a = -2.5 v) so the stop is gentle
                act = np.isfinite(prm["stop_s"]) & ~released
                gap = prm["stop_s"] - s
                req3 = v * v / (2 * np.maximum(gap - 0.3, 0.05))
                eng3 = (eng3 | (on_t & act & (req3 > 0.6 * b))) & act
                a3 = np.where(eng3, -np.minimum(req3, np.maximum(2.5 * v, 0.3)), np.inf)
                hold = act & (((v < 0.05) & (gap < 3.0)) | (gap < -0.5))
                a3 = np.where(hold, -B_MAX, a3)
                ac = np.minimum(np.minimum(a1, a2), a3)
                ac = np.where(t < prm["t_r"], K_V * (prm["v0"] - v), ac)
            ac = np.clip(ac, -B_MAX, A_MAX)
            a = a + (ac - a) * min(1.0, DT / TAU_A)
            vn = np.maximum(v + a * DT, 0.0)
            a = np.where(vn <= 0.0, np.maximum(a, 0.0), a)
            vm = 0.5 * (v + vn)
            pm = psi + 0.5 * vm * kap * DT
            x = x + vm * np.cos(pm) * DT
            y = y + vm * np.sin(pm) * DT
            psi = psi + vm * kap * DT
            v = vn
            t = t + DT
            if not hist:
                stopped = act & (v < 1e-3) & (gap < 3.0) & np.isnan(t_stop)
                t_stop = np.where(stopped, t, t_stop)
                with np.errstate(invalid="ignore"):
                    released = released | (t >= t_stop + prm["wait"] + prm["t_r2"])
        out[:, i, 0], out[:, i, 1], out[:, i, 2] = x, y, psi
        vout[:, i] = v
    st_end = dict(x=x, y=y, psi=psi, v=v, a=a, kap=kap, idx=idx)
    return out, vout, st_end


def run_history(rng, g):
    n = g["type"].size
    prm = dict(v0=g["v0"], a_h=g["a_h"],
               hw_amp=rng.uniform(0.0, 0.05, (n, 3)), hw_f=1.0 / rng.uniform(30.0, 150.0, (n, 3)),
               hw_ph=rng.uniform(0, 2 * np.pi, (n, 3)))
    T0 = -N_HIST_SIM * DT_OUT
    x0 = -(g["v0"] * (-T0) - 0.5 * g["a_h"] * T0 ** 2)
    w0 = wobble(prm["hw_amp"], prm["hw_f"], prm["hw_ph"], x0)
    st = dict(x=x0, y=w0, psi=np.zeros(n), v=g["v0"] + g["a_h"] * T0, a=g["a_h"].copy(),
              kap=np.zeros(n), idx=np.round((x0 - S0) / DS).astype(int))
    out, vout, st_end = simulate(straight_path(n), st, prm, T0, N_HIST_SIM, hist=True)
    st_end["s0"] = st_end["x"].copy()          # straight approach: arc length = x
    st_end["w0"] = wobble(prm["hw_amp"], prm["hw_f"], prm["hw_ph"], st_end["s0"])
    return out[:, -N_HIST:], vout[:, -N_HIST:], st_end


def run_future(rng, g, st0):
    p, path = sample_driver(rng, g)
    p["v0"] = g["v0"]
    p["s0"] = st0["s0"]
    p["w_off"] = st0["w0"] - wobble(p["w_amp"], p["w_f"], p["w_ph"], st0["s0"])
    out, vout, _ = simulate(path, st0, p, 0.0, N_FUT, hist=False)
    return out, vout, p


def to_frame(poses, st0):
    c, s = np.cos(st0["psi"])[:, None], np.sin(st0["psi"])[:, None]
    dx = poses[..., 0] - st0["x"][:, None]
    dy = poses[..., 1] - st0["y"][:, None]
    xyz = np.stack([c * dx + s * dy, -s * dx + c * dy, np.zeros_like(dx)], -1)
    yaw = poses[..., 2] - st0["psi"][:, None]
    return xyz, yaw


def make_cond(g, st0):
    k = g["type"]
    n = k.size
    c = np.zeros((n, 6))
    c[:, 0] = (g["v0"] - 8.0) / 3.5
    c[:, 1] = (k - 1.5) / 1.118
    c[:, 2] = (g["d"] - st0["x"] - 25.0) / 12.0
    c[:, 3] = np.where(k == 0, (np.nan_to_num(g["ped"]) - 1.25) / 2.75, 3.0)
    c[:, 4] = np.where(k == 2, (np.nan_to_num(g["R"]) - 16.0) / 2.3,
                       np.where(k == 3, np.where(g["hump"], 1.0, -1.0), 0.0))
    c[:, 5] = np.where(k == 1, (np.nan_to_num(g["gap"]) - 7.0) / 4.5,
                       np.where(k == 3, (np.nan_to_num(g["vpost"]) - 8.0) / 3.5, 0.0))
    return c.astype(np.float32)


def subset(d, sl):
    return {key: val[sl] for key, val in d.items()}


def generate(n, seed, n_oracle=0, batch=2000):
    """Returns dict of arrays (+ diagnostics)."""
    ss = np.random.SeedSequence(seed)
    res = {key: [] for key in ("hist_xyz", "hist_yaw", "fut_xyz", "fut_yaw", "cond",
                               "oracle_fut_xyz", "oracle_fut_yaw")}
    diag = {key: [] for key in ("type", "choice", "choice2", "v_hist", "v_fut",
                                "o_choice", "o_choice2", "o_v")}
    nb = (n + batch - 1) // batch
    children = ss.spawn(nb)
    for bi in range(nb):
        rng = np.random.default_rng(children[bi])
        m = min(batch, n - bi * batch)
        g = sample_scenes(rng, m)
        hist, vh, st0 = run_history(rng, g)
        fut, vf, p = run_future(rng, g, st0)
        hx, hy = to_frame(hist, st0)
        fx, fy = to_frame(fut, st0)
        res["hist_xyz"].append(hx); res["hist_yaw"].append(hy)
        res["fut_xyz"].append(fx); res["fut_yaw"].append(fy)
        res["cond"].append(make_cond(g, st0))
        diag["type"].append(g["type"]); diag["choice"].append(p["choice"])
        diag["choice2"].append(p["choice2"]); diag["v_hist"].append(vh); diag["v_fut"].append(vf)
        if n_oracle:
            gr = repeat_scenes(g, n_oracle)
            sr = {key: np.repeat(val, n_oracle, axis=0) for key, val in st0.items()}
            of, ov, op = run_future(rng, gr, sr)
            ox, oy = to_frame(of, sr)
            res["oracle_fut_xyz"].append(ox); res["oracle_fut_yaw"].append(oy)
            diag["o_choice"].append(op["choice"]); diag["o_choice2"].append(op["choice2"])
            diag["o_v"].append(ov)
    res = {key: np.concatenate(val) for key, val in res.items() if val}
    diag = {key: np.concatenate(val) for key, val in diag.items() if val}
    return res, diag


def save(out_dir, res):
    os.makedirs(out_dir, exist_ok=True)
    for key, val in res.items():
        np.save(os.path.join(out_dir, key + ".npy"), val)


# ----------------------------------------------------------------------------
# checks / report
# ----------------------------------------------------------------------------
CHOICE_NAMES = {0: {0: "yield", 1: "pass"}, 1: {0: "swerve_now", 1: "wait_swerve", 2: "stop"},
                2: {1: "exit1_right", 2: "exit2_straight", 3: "exit3_left"},
                3: {0: "limit_up", 1: "limit_down", 2: "hump"}}


def curvature(xyz, yaw, hist_xyz=None):
    """|dyaw/ds| between consecutive 0.1 s samples where the car moved > 5 cm."""
    p = xyz[..., :2]
    if hist_xyz is not None:
        p = np.concatenate([np.zeros_like(p[:, :1]), p], 1)
        yaw = np.concatenate([np.zeros_like(yaw[:, :1]), yaw], 1)
    ds = np.linalg.norm(np.diff(p, axis=1), axis=-1)
    dy = np.diff(yaw, axis=1)
    k = np.abs(dy) / np.maximum(ds, 1e-9)
    return k[ds > 0.05]


def report(name, res, diag):
    print(f"\n=== {name} ===")
    for key, val in res.items():
        print(f"  {key:16s} {str(val.shape):16s} {val.dtype}  NaN={np.isnan(val).any()}")
    fx, fy, hx = res["fut_xyz"], res["fut_yaw"], res["hist_xyz"]
    vf = np.linalg.norm(np.diff(np.concatenate([np.zeros_like(fx[:, :1]), fx], 1), axis=1), axis=-1) / DT_OUT
    print(f"  min speed state (fut) {diag['v_fut'].min():.4f}  max {diag['v_fut'].max():.2f} m/s")
    acc = np.diff(diag["v_fut"], axis=1) / DT_OUT
    print(f"  accel (fut, 0.1 s diff) min {acc.min():.2f}  max {acc.max():.2f} m/s^2")
    kk = curvature(fx, fy, hist_xyz=hx)
    print(f"  max |curvature| fut {kk.max():.4f} 1/m (99.9% {np.quantile(kk, 0.999):.4f})")
    if "oracle_fut_xyz" in res:
        ko = curvature(res["oracle_fut_xyz"], res["oracle_fut_yaw"], hist_xyz=True)
        print(f"  max |curvature| oracle {ko.max():.4f} 1/m")
    kh = curvature(hx, res["hist_yaw"])
    print(f"  max |curvature| hist {kh.max():.4f} 1/m")
    vh_last = np.linalg.norm(hx[:, -1, :2] - hx[:, -2, :2], axis=-1) / DT_OUT
    v_first = vf[:, 0]
    v0 = res["cond"][:, 0].astype(np.float64) * 3.5 + 8.0
    print(f"  continuity |v_hist_last - v_fut_first|: mean {np.abs(vh_last - v_first).mean():.4f}"
          f"  max {np.abs(vh_last - v_first).max():.4f} m/s"
          f"  (|v_hist_last - v0| max {np.abs(vh_last - v0).max():.4f})")
    cm, cs_ = res["cond"].mean(0), res["cond"].std(0)
    print("  cond mean " + " ".join(f"{x:6.2f}" for x in cm) + " | std " + " ".join(f"{x:5.2f}" for x in cs_))
    yh = np.abs(res["hist_yaw"][:, -1]).max()
    print(f"  hist last pose max |xyz| {np.abs(hx[:, -1]).max():.2e}, |yaw| {yh:.2e}")
    lat_h = np.abs(hx[:, :, 1]).max()
    print(f"  history max |y| {lat_h:.3f} m (wobble), fut max |yaw| {np.abs(fy).max():.2f} rad")
    dist = np.linalg.norm(np.diff(np.concatenate([np.zeros_like(fx[:, :1]), fx], 1), axis=1), axis=-1).sum(1)
    t = diag["type"]
    for k in range(4):
        m = t == k
        ch = diag["choice"][m]
        fr = ", ".join(f"{CHOICE_NAMES[k][c]}={np.mean(ch == c):.2f}" for c in sorted(CHOICE_NAMES[k]))
        extra = ""
        if k == 2:
            extra = f", yield_at_entry={np.mean(diag['choice2'][m] == 1):.2f}"
        print(f"  {TYPE_NAMES[k]:10s} n={m.sum():5d} share={m.mean():.2f}  mean dist 6.4s="
              f"{dist[m].mean():6.2f} m  (v0 mean {v0[m].mean():.2f})  {fr}{extra}")
        for c in sorted(CHOICE_NAMES[k]):
            mc = m & (diag["choice"] == c)
            if mc.any():
                print(f"      {CHOICE_NAMES[k][c]:15s} mean dist {dist[mc].mean():6.2f} m, "
                      f"mean end (x,y)=({fx[mc, -1, 0].mean():6.2f},{fx[mc, -1, 1].mean():6.2f})")


def report_oracle(res, diag, n_show=5):
    print("\n=== oracle multimodality (6 fresh futures per test scene) ===")
    ox = res["oracle_fut_xyz"]
    K = K_ORACLE
    n = ox.shape[0] // K
    end = ox[:, -1, :2].reshape(n, K, 2)
    oc = diag["o_choice"].reshape(n, K)
    oc2 = diag["o_choice2"].reshape(n, K)
    t = diag["type"]
    shown = []
    for k in [0, 1, 2, 3, 2]:
        cand = [i for i in range(n) if t[i] == k and i not in shown and len(set(oc[i])) > (1 if k < 3 else 0)]
        if cand:
            shown.append(cand[0])
    for i in shown[:n_show]:
        k = t[i]
        names = [CHOICE_NAMES[k][c] + ("+Y" if (k == 2 and oc2[i, j] == 1) else "") for j, c in enumerate(oc[i])]
        spread = np.sqrt(((end[i] - end[i].mean(0)) ** 2).sum(-1).mean())
        pair = np.linalg.norm(end[i][:, None] - end[i][None], axis=-1)
        print(f"  scene {i} ({TYPE_NAMES[k]}, cond={np.round(res['cond'][i], 2).tolist()}): "
              f"endpoint RMS spread {spread:.2f} m, max pairwise {pair.max():.2f} m")
        for j in range(K):
            print(f"      draw {j}: {names[j]:18s} end=({end[i, j, 0]:7.2f},{end[i, j, 1]:7.2f})")
    # aggregate: spread within same choice vs between different choices
    same, diff = [], []
    for i in range(n):
        for a in range(K):
            for b in range(a + 1, K):
                dd = np.linalg.norm(end[i, a] - end[i, b])
                (same if (oc[i, a] == oc[i, b] and oc2[i, a] == oc2[i, b]) else diff).append(dd)
    print(f"  all test scenes: mean endpoint distance between oracle draws with SAME hidden choice "
          f"{np.mean(same):.2f} m (n={len(same)}), DIFFERENT choice {np.mean(diff):.2f} m (n={len(diff)})")
    for k in range(4):
        s_, d_ = [], []
        for i in np.where(t == k)[0]:
            for a in range(K):
                for b in range(a + 1, K):
                    dd = np.linalg.norm(end[i, a] - end[i, b])
                    (s_ if (oc[i, a] == oc[i, b] and oc2[i, a] == oc2[i, b]) else d_).append(dd)
        if d_:
            print(f"  {TYPE_NAMES[k]:10s} pairs same choice: mean {np.mean(s_):.2f} m; different choice: "
                  f"mean {np.mean(d_):.2f} m, fraction > 2 m {np.mean(np.array(d_) > 2):.2f}")
    spr = np.sqrt(((end - end.mean(1, keepdims=True)) ** 2).sum(-1).mean(1))
    for k in range(4):
        print(f"  {TYPE_NAMES[k]:10s} mean oracle endpoint RMS spread {spr[t == k].mean():.2f} m")
    # distance of the test scene's own future to its oracle draws (should look like one more draw)
    fe = res["fut_xyz"][:, -1, :2]
    dmin_own = np.linalg.norm(end - fe[:, None], axis=-1).min(1)
    print(f"  minADE-like check: mean min_k |fut_end - oracle_end_k| = {dmin_own.mean():.2f} m")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    ss = np.random.SeedSequence(a.seed)
    s_train, s_test = ss.spawn(2)
    seed_train = int(s_train.generate_state(1)[0])
    seed_test = int(s_test.generate_state(1)[0])
    t0 = time.time()
    tr, dtr = generate(a.train, seed_train)
    t1 = time.time()
    save(os.path.join(a.out_dir, "train"), tr)
    t2 = time.time()
    te, dte = generate(a.test, seed_test, n_oracle=K_ORACLE)
    save(os.path.join(a.out_dir, "test"), te)
    t3 = time.time()
    print(f"timing: train gen {t1 - t0:.1f}s, save {t2 - t1:.1f}s, test+oracle {t3 - t2:.1f}s, "
          f"total {t3 - t0:.1f}s")
    if not a.no_report:
        report("train", tr, dtr)
        report("test", te, dte)
        report_oracle(te, dte)


if __name__ == "__main__":
    main()
