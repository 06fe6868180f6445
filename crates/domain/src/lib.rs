//! Domain rules with no I/O.
//!
//! # Layout
//! - [`month`]: the billing month (`YYYY-MM`) and its bounds in the business time zone.
//! - [`products`]: the product catalogue of a Korean mobile operator (plans, add-ons, device
//!   instalments, metered usage, roaming, micro-payments, discount rules), prices in won.
//! - [`validate`]: checks at the edge; a record that fails is a dead letter with the reason.
//! - [`generator`]: deterministic members and usage for a month, from a seed.
#![deny(clippy::float_arithmetic)]

pub mod generator;
pub mod month;
pub mod products;
pub mod rules;
pub mod validate;

pub use month::{BillingMonth, MonthError};
