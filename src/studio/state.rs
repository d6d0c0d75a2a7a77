//! What the studio shows, built only from the worker's events, so it can be tested without a
//! window.

use std::path::PathBuf;
use std::time::Instant;

use super::worker::{Comparison, Event, Picture};
use crate::erasure::evaluate::Report;
use crate::erasure::metrics::EpochMetrics;

/// Where the current run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Training,
    /// Stop requested; the run is saving its checkpoint.
    Stopping,
    Paused,
    Cancelled,
    Finished,
}

#[derive(Debug, Clone)]
pub struct RunState {
    pub dir: PathBuf,
    pub status: RunStatus,
    pub total_epochs: usize,
    /// Every finished epoch, the ones before a resume included.
    pub metrics: Vec<EpochMetrics>,
    /// When this session of the run started, and how many epochs it found done.
    started: Instant,
    epochs_at_start: usize,
}

impl RunState {
    pub fn epochs_done(&self) -> usize {
        self.metrics.last().map_or(0, |m| m.epoch)
    }

    /// Seconds left at the pace of this session's epochs, once one has finished.
    pub fn eta_seconds(&self) -> Option<f64> {
        let done_here = self.epochs_done().saturating_sub(self.epochs_at_start);
        if done_here == 0 || self.status != RunStatus::Training {
            return None;
        }
        let per_epoch = self.started.elapsed().as_secs_f64() / done_here as f64;
        Some(per_epoch * self.total_epochs.saturating_sub(self.epochs_done()) as f64)
    }
}

/// A line in the message area.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub text: String,
    pub is_error: bool,
}

#[derive(Debug, Default)]
pub struct StudioState {
    /// What the worker is doing, if anything.
    pub busy: Option<String>,
    pub model: Option<LoadedModel>,
    pub run: Option<RunState>,
    /// The latest before/after previews of the run, and the epoch they show.
    pub previews: Vec<Comparison>,
    pub preview_epoch: usize,
    /// The prompt box's and img2img tab's latest result.
    pub rendered: Option<Comparison>,
    pub evaluation: Option<Evaluation>,
    pub evaluation_progress: Option<(usize, usize)>,
    /// The adapter the gallery's erased side uses.
    pub adapter: Option<String>,
    pub messages: Vec<Message>,
    /// Counts events; the stamps below record the count at which each set of pictures last
    /// changed, so views upload textures only then.
    pub generation: u64,
    pub previews_stamp: u64,
    pub rendered_stamp: u64,
    pub evaluation_stamp: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    pub spec: String,
    pub description: String,
}

#[derive(Debug, Clone)]
pub struct Evaluation {
    pub report: Report,
    pub grid: Picture,
}

impl StudioState {
    pub fn apply(&mut self, event: Event) {
        self.generation += 1;
        match event {
            Event::Busy(job) => self.busy = job,
            Event::ModelLoaded {
                spec, description, ..
            } => {
                self.info(format!("loaded {description}"));
                self.model = Some(LoadedModel { spec, description });
                self.rendered = None;
                self.previews.clear();
            }
            Event::RunStarted {
                run,
                total_epochs,
                history,
            } => {
                self.info(format!("training in {}", run.display()));
                self.run = Some(RunState {
                    dir: run,
                    status: RunStatus::Training,
                    total_epochs,
                    epochs_at_start: history.last().map_or(0, |m| m.epoch),
                    metrics: history,
                    started: Instant::now(),
                });
                self.evaluation = None;
            }
            Event::Epoch { metrics, .. } => {
                if let Some(run) = &mut self.run {
                    if let Some(reason) = &metrics.skipped_reason {
                        let text = format!("epoch {}: update skipped ({reason})", metrics.epoch);
                        self.messages.push(Message {
                            text,
                            is_error: true,
                        });
                    }
                    run.metrics.push(*metrics);
                }
            }
            Event::Preview { epoch, comparisons } => {
                self.previews = comparisons;
                self.preview_epoch = epoch;
                self.previews_stamp = self.generation;
            }
            Event::RunStopped {
                run,
                epochs_done,
                cancelled,
            } => {
                let status = if cancelled {
                    RunStatus::Cancelled
                } else {
                    RunStatus::Paused
                };
                self.set_status(status);
                let verb = if cancelled { "cancelled" } else { "paused" };
                self.info(format!(
                    "{verb} after epoch {epochs_done}; checkpoint saved in {}",
                    run.display()
                ));
            }
            Event::RunFinished {
                adapter, seconds, ..
            } => {
                self.set_status(RunStatus::Finished);
                self.info(format!(
                    "finished in {:.1} min; adapter saved to {}",
                    seconds / 60.0,
                    adapter.display()
                ));
            }
            Event::Rendered(comparison) => {
                self.rendered = Some(comparison);
                self.rendered_stamp = self.generation;
            }
            Event::EvaluationProgress { done, total } => {
                self.evaluation_progress = Some((done, total))
            }
            Event::Evaluated { report, grid } => {
                self.evaluation_progress = None;
                self.evaluation = Some(Evaluation {
                    report: *report,
                    grid,
                });
                self.evaluation_stamp = self.generation;
            }
            Event::AdapterChanged(description) => {
                if let Some(d) = &description {
                    self.info(format!("adapter: {d}"));
                }
                self.adapter = description;
            }
            Event::AdapterExported { path, comparison } => {
                self.evaluation_progress = None;
                self.info(format!("adapter exported to {}", path.display()));
                if let Some(c) = comparison {
                    self.info(c.summary());
                    if !c.keeps_most() {
                        self.info(
                            "the export keeps little of the erasure, which the Safe Adapter does \
                             most of: fold it in at a higher rank (8 is a good start)"
                                .into(),
                        );
                    }
                }
            }
            Event::Notice(text) => self.info(text),
            Event::Error(text) => {
                self.messages.push(Message {
                    text,
                    is_error: true,
                });
                self.evaluation_progress = None;
            }
        }
    }

    /// The UI asked the run to stop; it keeps training until the worker confirms.
    pub fn stop_requested(&mut self) {
        self.set_status(RunStatus::Stopping);
    }

    pub fn is_training(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| matches!(r.status, RunStatus::Training | RunStatus::Stopping))
    }

    fn set_status(&mut self, status: RunStatus) {
        if let Some(run) = &mut self.run {
            run.status = status;
        }
    }

    fn info(&mut self, text: String) {
        self.messages.push(Message {
            text,
            is_error: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasure::metrics::Spread;

    fn epoch(n: usize) -> EpochMetrics {
        let s = Spread {
            mean: 0.5,
            std: 0.1,
        };
        EpochMetrics {
            epoch: n,
            p_concept: s,
            reward_erase: s,
            reward_align: s,
            reward_total: s,
            reward_unnormalised: Some(s),
            loss: 0.0,
            clip_fraction: 0.0,
            approx_kl: 0.0,
            preservation_drift: None,
            anchor_distance: None,
            grad_norm: 0.0,
            updates: 1,
            skipped_updates: 0,
            skipped_losses: 0,
            skipped_reason: None,
            seconds_sampling: 1.0,
            seconds_reward: 0.1,
            seconds_training: 1.0,
            seconds: 2.1,
        }
    }

    #[test]
    fn a_run_goes_from_training_to_paused_to_finished() {
        let mut state = StudioState::default();
        state.apply(Event::RunStarted {
            run: "r".into(),
            total_epochs: 4,
            history: vec![epoch(1)],
        });
        assert!(state.is_training());
        assert_eq!(state.run.as_ref().unwrap().epochs_done(), 1);
        assert_eq!(state.run.as_ref().unwrap().eta_seconds(), None);
        state.apply(Event::Epoch {
            metrics: Box::new(epoch(2)),
            total_epochs: 4,
        });
        let eta = state.run.as_ref().unwrap().eta_seconds().unwrap();
        assert!(eta >= 0.0);
        state.stop_requested();
        assert!(
            state.is_training(),
            "training until the worker confirms the stop"
        );
        state.apply(Event::RunStopped {
            run: "r".into(),
            epochs_done: 2,
            cancelled: false,
        });
        assert_eq!(state.run.as_ref().unwrap().status, RunStatus::Paused);
        assert!(!state.is_training());
        state.apply(Event::RunFinished {
            run: "r".into(),
            adapter: "r/adapter.safetensors".into(),
            seconds: 60.0,
        });
        assert_eq!(state.run.as_ref().unwrap().status, RunStatus::Finished);
    }

    #[test]
    fn errors_and_skipped_updates_become_messages() {
        let mut state = StudioState::default();
        state.apply(Event::RunStarted {
            run: "r".into(),
            total_epochs: 2,
            history: vec![],
        });
        let mut skipped = epoch(1);
        skipped.skipped_reason = Some("reward is NaN".into());
        state.apply(Event::Epoch {
            metrics: Box::new(skipped),
            total_epochs: 2,
        });
        state.apply(Event::EvaluationProgress { done: 1, total: 8 });
        state.apply(Event::Error("cannot read x".into()));
        let errors: Vec<&str> = state
            .messages
            .iter()
            .filter(|m| m.is_error)
            .map(|m| m.text.as_str())
            .collect();
        assert_eq!(
            errors,
            ["epoch 1: update skipped (reward is NaN)", "cannot read x"]
        );
        assert_eq!(state.evaluation_progress, None, "a failed evaluation ends");
    }
}
