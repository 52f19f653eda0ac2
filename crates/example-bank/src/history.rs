//! Events as the bank's first release stored them, kept only to be read:
//! their upcasters read them as today's [`AccountEvent`]s on every path
//! (loading an account, the balance view, rebuilds, the read API), and no
//! stored event is rewritten.
//!
//! The messages are written out here rather than in `bank.proto`: nothing
//! produces them any more, and clients never see them.

use scaleout::domain::KnownTypes;

use crate::account::AccountEvent;
use crate::pb;

/// The first release opened an account and took its first deposit in one
/// event. Now that is two, an opening and a deposit, at the same version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AccountOpenedWithDeposit {
    #[prost(string, tag = "1")]
    pub account_id: String,
    #[prost(string, tag = "2")]
    pub owner: String,
    /// In cents; 0 opened an empty account.
    #[prost(uint64, tag = "3")]
    pub initial_deposit: u64,
}

impl prost::Name for AccountOpenedWithDeposit {
    const NAME: &'static str = "AccountOpenedWithDeposit";
    const PACKAGE: &'static str = "bank.v0";
}

/// The first release's withdrawal: its fields were renamed (`cents` is
/// `amount`, `account` is `account_id`) and renumbered in
/// [`pb::MoneyWithdrawn`], so Protobuf alone cannot read one as the other.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Withdrawal {
    #[prost(uint64, tag = "1")]
    pub cents: u64,
    #[prost(string, tag = "2")]
    pub account: String,
}

impl prost::Name for Withdrawal {
    const NAME: &'static str = "Withdrawal";
    const PACKAGE: &'static str = "bank.v0";
}

/// `known` reading the first release's events too.
pub fn upcast(known: KnownTypes) -> KnownTypes {
    known.upcast(split_opening).upcast(rename_withdrawal)
}

fn split_opening(old: AccountOpenedWithDeposit) -> Vec<AccountEvent> {
    let mut events = vec![AccountEvent::Opened(pb::AccountOpened {
        account_id: old.account_id.clone(),
        owner: old.owner,
    })];
    if old.initial_deposit > 0 {
        events.push(AccountEvent::Deposited(pb::MoneyDeposited {
            account_id: old.account_id,
            amount: old.initial_deposit,
        }));
    }
    events
}

fn rename_withdrawal(old: Withdrawal) -> Vec<AccountEvent> {
    vec![AccountEvent::Withdrawn(pb::MoneyWithdrawn {
        account_id: old.account,
        amount: old.cents,
    })]
}
