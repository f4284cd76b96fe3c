//! Progress for long work: an indicatif bar on stderr, shown only when
//! stderr is a terminal, not quiet, and the work has run for over a second.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    enabled: bool,
    start: Instant,
    title: &'static str,
}

impl Progress {
    /// `quiet` or a non-terminal stderr disables it. `also_needs` lets a tool
    /// add a condition (dump: not while its output goes to the same terminal).
    pub fn new(title: &'static str, quiet: bool, also_needs: bool) -> Progress {
        let enabled = !quiet && also_needs && std::io::stderr().is_terminal();
        Progress {
            bar: None,
            enabled,
            start: Instant::now(),
            title,
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        if self.bar.is_none() {
            if self.start.elapsed() < Duration::from_secs(1) || done >= total {
                return;
            }
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:40}] {percent}% ({eta} left)")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(self.title);
            self.bar = Some(bar);
        }
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
