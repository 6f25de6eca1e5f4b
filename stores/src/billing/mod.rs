//! Billing: the versioned price book ([`prices`]), exact money ([`money`]), monthly spend
//! budgets ([`budgets`]), billing periods
//! ([`period`]), the arithmetic of an invoice ([`statement`]), invoices in the stores — runs,
//! previews, reading them back ([`invoices`]) — finance's CSV exports ([`csv`]) and the
//! comparison of a month's usage across its sources ([`reconcile`]).
//!
//! Usage is priced when it is read, by event time: the price book only ever gains versions
//! that start from now on, so the version in force at any past moment never changes, and every
//! invoice line names the version it used.

pub mod budgets;
pub mod csv;
pub mod invoices;
pub mod money;
pub mod period;
pub mod prices;
pub mod reconcile;
pub mod statement;

pub use invoices::Invoice;
pub use money::{Currency, Exact, Minor};
pub use period::Period;
pub use prices::{PriceBook, PriceVersion};
