//! One client connection: its negotiated features, who it authenticated as,
//! which bucket it selected, and the answer to each request.

use std::sync::Arc;

use crate::faults::{Fault, Faults};
use crate::protocol::{
    self, DATATYPE_JSON, MAX_VALUE, MalformedFraming, Request, Response, feature, opcode,
    split_collection, status,
};
use crate::scram::{Exchange, Refusal};
use crate::store::{Item, Mode, Store};
use crate::{ServerConfig, config};

const SCRAM_SHA512: &[u8] = b"SCRAM-SHA512";
const PLAIN: &[u8] = b"PLAIN";

/// GET_ERROR_MAP's answer: the SDK retries ENOMEM, EBUSY and the like only
/// because the map says so.
const ERROR_MAP: &[u8] = include_bytes!("error_map.json");

/// What every connection of one server shares.
#[derive(Debug, Clone)]
pub struct Shared {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    pub port: u16,
    pub faults: Faults,
    /// The same in every config revision, so the SDK sees one bucket.
    pub bucket_uuid: Arc<str>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Answer {
    Reply(Response),
    /// Close the connection without answering.
    HangUp,
}

/// The state one connection carries between requests.
#[derive(Debug)]
pub struct Connection {
    server: Shared,
    collections: bool,
    datatype: bool,
    user: Option<String>,
    bucket: Option<String>,
    exchange: Option<Exchange>,
}

impl Connection {
    pub fn new(server: Shared) -> Self {
        Self {
            server,
            collections: false,
            datatype: false,
            user: None,
            bucket: None,
            exchange: None,
        }
    }

    pub fn handle(&mut self, request: &Request) -> Answer {
        if let Some(Fault::DropMidWrite { applied }) = self.server.faults.active()
            && self.bucket.is_some()
            && opcode::is_mutation(request.opcode)
        {
            if applied {
                // Written, and the answer lost with the connection.
                self.respond(request);
            }
            return Answer::HangUp;
        }
        Answer::Reply(self.respond(request))
    }

    fn respond(&mut self, request: &Request) -> Response {
        match request.opcode {
            opcode::HELLO => self.hello(request),
            opcode::NOOP => Response::to(request, status::SUCCESS),
            opcode::GET_ERROR_MAP => json(Response::to(request, status::SUCCESS), ERROR_MAP),
            opcode::SASL_LIST_MECHS => {
                Response::to(request, status::SUCCESS).with_value(b"SCRAM-SHA512 PLAIN".as_slice())
            }
            opcode::SASL_AUTH => self.sasl_auth(request),
            opcode::SASL_STEP => self.sasl_step(request),
            _ if self.user.is_none() => Response::to(request, status::EACCESS),
            opcode::SELECT_BUCKET => self.select_bucket(request),
            opcode::GET_CLUSTER_CONFIG => json(
                Response::to(request, status::SUCCESS),
                self.cluster_config(),
            ),
            opcode::GET | opcode::SET | opcode::ADD | opcode::REPLACE | opcode::DELETE => {
                self.document(request)
            }
            _ => Response::to(request, status::UNKNOWN_COMMAND),
        }
    }

    /// The bucket's config once one is selected, the cluster's before.
    fn cluster_config(&self) -> Vec<u8> {
        let (port, rev) = (self.server.port, self.server.faults.config_rev());
        match &self.bucket {
            Some(bucket) => config::bucket(port, rev, bucket, &self.server.bucket_uuid),
            None => config::cluster(port, rev),
        }
    }

    fn hello(&mut self, request: &Request) -> Response {
        let asked: Vec<u16> = request
            .value
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        let agreed: Vec<u16> = asked
            .into_iter()
            .filter(|f| feature::SUPPORTED.contains(f))
            .collect();
        self.collections = agreed.contains(&feature::COLLECTIONS);
        self.datatype = agreed.contains(&feature::DATATYPE);
        let value: Vec<u8> = agreed.iter().flat_map(|f| f.to_be_bytes()).collect();
        Response::to(request, status::SUCCESS).with_value(value)
    }

    fn sasl_auth(&mut self, request: &Request) -> Response {
        self.exchange = None;
        let value = String::from_utf8_lossy(&request.value);
        match request.key.as_slice() {
            PLAIN => {
                let mut parts = value.split('\0').skip(1);
                let (user, password) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let server = &self.server.config;
                if user == server.username && password == server.password {
                    self.user = Some(user.to_owned());
                    Response::to(request, status::SUCCESS).with_value(b"Authenticated".as_slice())
                } else {
                    Response::to(request, status::AUTH_ERROR)
                }
            }
            SCRAM_SHA512 => {
                let server = &self.server.config;
                let password_of =
                    |user: &str| (user == server.username).then(|| server.password.clone());
                match Exchange::start(&value, password_of) {
                    Ok((exchange, server_first)) => {
                        self.exchange = Some(exchange);
                        Response::to(request, status::AUTH_CONTINUE).with_value(server_first)
                    }
                    Err(_) => Response::to(request, status::AUTH_ERROR),
                }
            }
            _ => Response::to(request, status::AUTH_ERROR),
        }
    }

    fn sasl_step(&mut self, request: &Request) -> Response {
        let Some(exchange) = self.exchange.take() else {
            return Response::to(request, status::AUTH_ERROR);
        };
        match exchange.finish(&String::from_utf8_lossy(&request.value)) {
            Ok((user, server_final)) => {
                self.user = Some(user);
                Response::to(request, status::SUCCESS).with_value(server_final)
            }
            Err(Refusal::Malformed | Refusal::WrongCredentials) => {
                Response::to(request, status::AUTH_ERROR)
            }
        }
    }

    fn select_bucket(&mut self, request: &Request) -> Response {
        let name = String::from_utf8_lossy(&request.key).into_owned();
        if self.server.store.has_bucket(&name) {
            self.bucket = Some(name);
            Response::to(request, status::SUCCESS)
        } else {
            // What Couchbase Server answers for a bucket that does not exist.
            Response::to(request, status::EACCESS)
        }
    }

    fn document(&mut self, request: &Request) -> Response {
        let Some(bucket) = self.bucket.clone() else {
            return Response::to(request, status::NO_BUCKET);
        };
        let key = if self.collections {
            match split_collection(&request.key) {
                Some((0, key)) => key,
                Some(_) => return Response::to(request, status::UNKNOWN_COLLECTION),
                None => return Response::to(request, status::INVALID_ARGUMENTS),
            }
        } else {
            request.key.as_slice()
        };
        if let Err(refusal) = checked_durability(request) {
            return Response::to(request, refusal);
        }
        if request.value.len() > MAX_VALUE {
            return Response::to(request, status::TOO_BIG);
        }
        match self.server.faults.active() {
            Some(Fault::TemporaryFailure) => return Response::to(request, status::TMPFAIL),
            // As Couchbase Server does, with the config the client should use now.
            Some(Fault::NotMyVbucket) => {
                return json(
                    Response::to(request, status::NOT_MY_VBUCKET),
                    self.cluster_config(),
                );
            }
            _ => {}
        }
        let store = &self.server.store;
        let outcome = match request.opcode {
            opcode::GET => {
                return match store.get(&bucket, key) {
                    Ok(item) => Response {
                        cas: item.cas,
                        extras: item.flags.to_be_bytes().to_vec(),
                        datatype: if self.datatype { item.datatype } else { 0 },
                        ..Response::to(request, status::SUCCESS).with_value(item.value)
                    },
                    Err(status) => Response::to(request, status),
                };
            }
            opcode::DELETE => store.delete(&bucket, key, request.cas),
            mutation => {
                let Some(flags) = request.extras.get(..4) else {
                    return Response::to(request, status::INVALID_ARGUMENTS);
                };
                let mode = match mutation {
                    opcode::ADD => Mode::Add,
                    opcode::REPLACE => Mode::Replace,
                    _ => Mode::Set,
                };
                let item = Item {
                    value: request.value.clone(),
                    flags: u32::from_be_bytes([flags[0], flags[1], flags[2], flags[3]]),
                    datatype: request.datatype,
                    cas: 0,
                };
                store.mutate(&bucket, key, mode, request.cas, item)
            }
        };
        match outcome {
            Ok(cas) => Response {
                cas,
                ..Response::to(request, status::SUCCESS)
            },
            Err(status) => Response::to(request, status),
        }
    }
}

fn json(response: Response, body: impl Into<Vec<u8>>) -> Response {
    Response {
        datatype: DATATYPE_JSON,
        ..response.with_value(body)
    }
}

/// Durability is for mutations, at a known level. On this one node with no
/// replicas every level is met as soon as the write is done (in memory), so
/// a durable write is then applied like a plain one.
fn checked_durability(request: &Request) -> Result<(), u16> {
    match protocol::durability(&request.framing) {
        Err(MalformedFraming) => Err(status::INVALID_ARGUMENTS),
        Ok(None) => Ok(()),
        Ok(Some(_)) if !opcode::is_mutation(request.opcode) => Err(status::INVALID_ARGUMENTS),
        Ok(Some(1..=3)) => Ok(()),
        Ok(Some(_)) => Err(status::DURABILITY_INVALID_LEVEL),
    }
}
