//! Renders the library's progress reports as an indicatif bar on stderr (hidden when stderr is
//! not a terminal, so pipes and CI logs stay clean).

use std::io::IsTerminal;

use flow_matching::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar that follows [`Progress`] reports; it finishes when dropped.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar for a job of `total` units labelled by `unit` ("step", "setting").
    pub fn new(total: usize, unit: &str) -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        let template = format!(
            "{unit} {{pos}}/{{len}} {{wide_bar}} {{per_sec}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        Bar(bar)
    }

    /// A callback for the library that moves this bar (a cheap clone of the bar's handle).
    pub fn callback(&self) -> impl FnMut(&Progress) + Send + 'static {
        let bar = self.0.clone();
        move |p: &Progress| {
            // A run planned from its measured rate changes its total as it goes.
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            match (p.loss, p.lr) {
                (Some(loss), Some(lr)) => bar.set_message(format!("loss {loss:.5} lr {lr:.2e}")),
                (Some(loss), None) => bar.set_message(format!("loss {loss:.5}")),
                _ => {}
            }
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
