//! The bank's gRPC services: parse into validated values, call the kernel,
//! let the kernel map errors to statuses.

use std::sync::Arc;
use std::time::Duration;

use scaleout::command::{Command, CommandHandler, Origin};
use scaleout::domain::values::Id;
use scaleout::grpc::Violations;
use scaleout::grpc::command_request::{command_result, expected_version, origin, request_key};
use scaleout::grpc::query_request::wait_deadline;
use scaleout::pb::CommandResult;
use scaleout::query::Queries;
use scaleout::store::RequestKey;
use tonic::{Request, Response, Status};

use crate::account::{Account, AccountCommand, Cents, Owner};
use crate::balance::{Balance, BalanceProjection, balance_key};
use crate::pb;

/// `bank.v1.BankService`.
#[derive(Debug, Clone)]
pub struct BankApi {
    handler: Arc<CommandHandler>,
}

impl BankApi {
    pub fn new(handler: Arc<CommandHandler>) -> Self {
        Self { handler }
    }

    async fn run(&self, command: Command<AccountCommand>) -> Result<Option<CommandResult>, Status> {
        let outcome = self.handler.execute::<Account>(command).await?;
        Ok(Some(command_result(outcome.into_result())))
    }
}

#[tonic::async_trait]
impl pb::bank_service_server::BankService for BankApi {
    async fn open_account(
        &self,
        request: Request<pb::OpenAccountRequest>,
    ) -> Result<Response<pb::OpenAccountResponse>, Status> {
        let origin = origin(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(account_id), Some(owner)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("account_id", Id::parse(&body.account_id)),
            violations.check("owner", Owner::parse(&body.owner)),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run(Command {
                aggregate_id: account_id,
                command: AccountCommand::Open { owner },
                expected: None,
                request_key,
                origin,
            })
            .await?;
        Ok(Response::new(pb::OpenAccountResponse { result }))
    }

    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        let origin = origin(&request);
        let body = request.into_inner();
        let result = self
            .move_money(
                Money {
                    request_key: request_key(&body, &body.request_id),
                    account_id: &body.account_id,
                    amount: body.amount,
                    expected: body.expected_version,
                    origin,
                },
                |amount| AccountCommand::Deposit { amount },
            )
            .await?;
        Ok(Response::new(pb::DepositResponse { result }))
    }

    async fn withdraw(
        &self,
        request: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let origin = origin(&request);
        let body = request.into_inner();
        let result = self
            .move_money(
                Money {
                    request_key: request_key(&body, &body.request_id),
                    account_id: &body.account_id,
                    amount: body.amount,
                    expected: body.expected_version,
                    origin,
                },
                |amount| AccountCommand::Withdraw { amount },
            )
            .await?;
        Ok(Response::new(pb::WithdrawResponse { result }))
    }
}

/// What a deposit and a withdrawal both carry, read off their request.
struct Money<'a> {
    request_key: Result<Option<RequestKey>, String>,
    account_id: &'a str,
    amount: u64,
    expected: Option<scaleout::pb::ExpectedVersion>,
    origin: Origin,
}

impl BankApi {
    /// Validates a deposit's or withdrawal's fields and runs `command`.
    async fn move_money(
        &self,
        money: Money<'_>,
        command: fn(Cents) -> AccountCommand,
    ) -> Result<Option<CommandResult>, Status> {
        let mut violations = Violations::default();
        let (Some(request_key), Some(account_id), Some(amount)) = (
            violations.check("request_id", money.request_key),
            violations.check("account_id", Id::parse(money.account_id)),
            violations.check("amount", Cents::parse(money.amount)),
        ) else {
            return Err(violations.into_status());
        };
        self.run(Command {
            aggregate_id: account_id,
            command: command(amount),
            expected: expected_version(money.expected),
            request_key,
            origin: money.origin,
        })
        .await
    }
}

/// `bank.v1.BankQueryService`.
#[derive(Debug, Clone)]
pub struct BankQueryApi {
    queries: Queries,
    max_wait: Duration,
}

impl BankQueryApi {
    pub fn new(queries: Queries, max_wait: Duration) -> Self {
        Self { queries, max_wait }
    }
}

#[tonic::async_trait]
impl pb::bank_query_service_server::BankQueryService for BankQueryApi {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let deadline = wait_deadline(&request, self.max_wait);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some(account_id) = violations.check("account_id", Id::parse(&body.account_id)) else {
            return Err(violations.into_status());
        };
        let id = account_id.as_str();
        let wanted = match body.min_version {
            0 => Vec::new(),
            version => vec![(format!("account-{id}"), version)],
        };
        let view: Balance = self
            .queries
            .read::<BalanceProjection>("account", id, &balance_key(id), &wanted, deadline)
            .await?;
        Ok(Response::new(pb::GetBalanceResponse {
            account_id: view.account_id,
            owner: view.owner,
            balance: view.balance,
            version: view.version,
        }))
    }
}
