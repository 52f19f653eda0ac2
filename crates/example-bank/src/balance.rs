//! The one read model: each account's balance.

use serde::{Deserialize, Serialize};

use scaleout::projection::{Event, Projection, Refused, Route};

use crate::account::{Account, AccountEvent};

/// Where an account's balance is kept.
pub fn balance_key(account_id: &str) -> String {
    format!("balance::{account_id}")
}

/// An account as its holder sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub account_id: String,
    pub owner: String,
    /// In cents.
    pub balance: u64,
    /// The account stream's version this balance reflects.
    pub version: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct BalanceProjection;

impl Projection for BalanceProjection {
    type Source = Account;
    type View = Balance;
    const NAME: &'static str = "balance";

    fn routes(&self, event: &Event<AccountEvent>) -> Vec<Route> {
        let account_id = match &event.payload {
            AccountEvent::Opened(e) => &e.account_id,
            AccountEvent::Deposited(e) => &e.account_id,
            AccountEvent::Withdrawn(e) => &e.account_id,
        };
        vec![Route::sequence(balance_key(account_id))]
    }

    fn apply(
        &self,
        _key: &str,
        view: &mut Balance,
        event: &Event<AccountEvent>,
    ) -> Result<(), Refused> {
        match &event.payload {
            AccountEvent::Opened(e) => {
                view.account_id.clone_from(&e.account_id);
                view.owner.clone_from(&e.owner);
            }
            AccountEvent::Deposited(e) => {
                view.balance = view.balance.checked_add(e.amount).ok_or_else(|| {
                    Refused(format!("account {}: the balance overflows", e.account_id))
                })?;
            }
            AccountEvent::Withdrawn(e) => {
                view.balance = view.balance.checked_sub(e.amount).ok_or_else(|| {
                    Refused(format!(
                        "account {}: the balance goes below zero",
                        e.account_id
                    ))
                })?;
            }
        }
        view.version = event.version;
        Ok(())
    }
}
