//! The account aggregate: open, deposit, withdraw; never below zero.

use scaleout::domain::values::{Invalid, Lines, text};
use scaleout::domain::{Aggregate, DomainError};
use scaleout::domain_event;

use crate::pb;

domain_event!(
    /// Everything that happens to an account.
    AccountEvent {
        Opened(pb::AccountOpened),
        Deposited(pb::MoneyDeposited),
        Withdrawn(pb::MoneyWithdrawn),
    }
);

/// An account holder's name: 1 to 64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    pub fn parse(value: &str) -> Result<Self, Invalid> {
        text(value, 64, Lines::Refused).map(Self)
    }
}

/// An amount of money in cents: 1 to 1,000,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cents(u64);

impl Cents {
    pub const MAX: u64 = 1_000_000_000;

    pub fn parse(value: u64) -> Result<Self, Invalid> {
        if (1..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Invalid(format!(
                "must be between 1 and {}, got {value}",
                Self::MAX
            )))
        }
    }
}

/// What a user can ask of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    Open { owner: Owner },
    Deposit { amount: Cents },
    Withdraw { amount: Cents },
}

/// An account's state, as far as decisions need it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Account {
    #[default]
    Missing,
    Open {
        balance: u64,
    },
}

impl Aggregate for Account {
    const STREAM_TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;

    fn decide(&self, id: &str, command: &AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
        let account_id = id.to_owned();
        match (self, command) {
            (Account::Missing, AccountCommand::Open { owner }) => {
                Ok(vec![AccountEvent::Opened(pb::AccountOpened {
                    account_id,
                    owner: owner.0.clone(),
                })])
            }
            (Account::Open { .. }, AccountCommand::Open { .. }) => {
                Err(DomainError::AlreadyExists {
                    kind: "account",
                    id: account_id,
                })
            }
            (Account::Missing, _) => Err(DomainError::NotFound {
                kind: "account",
                id: account_id,
            }),
            (Account::Open { balance }, AccountCommand::Deposit { amount }) => {
                if balance.checked_add(amount.0).is_none() {
                    return Err(refusal(
                        "BALANCE_TOO_LARGE",
                        id,
                        "the balance would overflow",
                    ));
                }
                Ok(vec![AccountEvent::Deposited(pb::MoneyDeposited {
                    account_id,
                    amount: amount.0,
                })])
            }
            (Account::Open { balance }, AccountCommand::Withdraw { amount }) => {
                if amount.0 > *balance {
                    return Err(refusal(
                        "INSUFFICIENT_FUNDS",
                        id,
                        &format!("the balance is {balance} cents, {} asked", amount.0),
                    ));
                }
                Ok(vec![AccountEvent::Withdrawn(pb::MoneyWithdrawn {
                    account_id,
                    amount: amount.0,
                })])
            }
        }
    }

    fn apply(&mut self, event: AccountEvent) {
        *self = match (&*self, event) {
            (_, AccountEvent::Opened(_)) => Account::Open { balance: 0 },
            (Account::Open { balance }, AccountEvent::Deposited(e)) => Account::Open {
                balance: balance.saturating_add(e.amount),
            },
            (Account::Open { balance }, AccountEvent::Withdrawn(e)) => Account::Open {
                balance: balance.saturating_sub(e.amount),
            },
            (Account::Missing, _) => Account::Missing,
        };
    }
}

fn refusal(rule: &'static str, id: &str, description: &str) -> DomainError {
    DomainError::Precondition {
        rule,
        subject: format!("account/{id}"),
        description: format!("account {id}: {description}"),
    }
}

#[cfg(test)]
mod tests {
    use scaleout::domain::testing::given;

    use super::*;

    fn opened() -> AccountEvent {
        AccountEvent::Opened(pb::AccountOpened {
            account_id: "a".into(),
            owner: "Ada".into(),
        })
    }

    fn deposited(amount: u64) -> AccountEvent {
        AccountEvent::Deposited(pb::MoneyDeposited {
            account_id: "a".into(),
            amount,
        })
    }

    fn cents(n: u64) -> Cents {
        Cents::parse(n).unwrap()
    }

    #[test]
    fn an_account_opens_once() {
        let open = AccountCommand::Open {
            owner: Owner::parse("Ada").unwrap(),
        };
        given::<Account>([])
            .when("a", open.clone())
            .then([opened()]);
        given::<Account>([opened()])
            .when("a", open)
            .then_err(DomainError::AlreadyExists {
                kind: "account",
                id: "a".into(),
            });
    }

    #[test]
    fn money_moves_only_in_an_open_account() {
        given::<Account>([])
            .when("a", AccountCommand::Deposit { amount: cents(5) })
            .then_err(DomainError::NotFound {
                kind: "account",
                id: "a".into(),
            });
        given::<Account>([opened()])
            .when("a", AccountCommand::Deposit { amount: cents(5) })
            .then([deposited(5)]);
    }

    #[test]
    fn a_withdrawal_never_takes_the_balance_below_zero() {
        let history = [opened(), deposited(100)];
        given::<Account>(history.clone())
            .when("a", AccountCommand::Withdraw { amount: cents(100) })
            .then([AccountEvent::Withdrawn(pb::MoneyWithdrawn {
                account_id: "a".into(),
                amount: 100,
            })]);
        given::<Account>(history)
            .when("a", AccountCommand::Withdraw { amount: cents(101) })
            .then_rule("INSUFFICIENT_FUNDS");
    }

    #[test]
    fn amounts_and_owners_are_validated() {
        assert!(Cents::parse(0).is_err());
        assert!(Cents::parse(Cents::MAX + 1).is_err());
        assert!(Owner::parse("").is_err());
        assert!(Owner::parse("evil\u{202E}").is_err());
    }
}
