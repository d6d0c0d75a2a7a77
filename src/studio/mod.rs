//! The desktop studio: an egui window over a worker thread that owns the models.
//!
//! ```text
//! ui (app, controls, views) ──Command──▶ worker ──▶ engine / erasure / run folders
//!    ▲                                      │
//!    └──────────────Event───────────────────┘   (the UI thread never runs a model)
//! ```

pub mod app;
mod controls;
pub mod forms;
pub mod state;
mod textures;
mod views;
pub mod worker;
