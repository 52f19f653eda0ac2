//! One client connection: its negotiated features, who it authenticated as,
//! which bucket it selected, and the answer to each request.

use crate::protocol::{
    DATATYPE_JSON, Request, Response, feature, opcode, split_collection, status,
};
use crate::scram::{Exchange, Refusal};
use crate::store::{Item, Mode, Store};
use crate::{ServerConfig, config};

const SCRAM_SHA512: &[u8] = b"SCRAM-SHA512";
const PLAIN: &[u8] = b"PLAIN";

/// The state one connection carries between requests.
#[derive(Debug)]
pub struct Connection {
    store: Store,
    server: std::sync::Arc<ServerConfig>,
    port: u16,
    collections: bool,
    datatype: bool,
    user: Option<String>,
    bucket: Option<String>,
    exchange: Option<Exchange>,
}

impl Connection {
    pub fn new(store: Store, server: std::sync::Arc<ServerConfig>, port: u16) -> Self {
        Self {
            store,
            server,
            port,
            collections: false,
            datatype: false,
            user: None,
            bucket: None,
            exchange: None,
        }
    }

    pub fn handle(&mut self, request: &Request) -> Response {
        match request.opcode {
            opcode::HELLO => self.hello(request),
            opcode::NOOP => Response::to(request, status::SUCCESS),
            opcode::GET_ERROR_MAP => Response::to(request, status::SUCCESS)
                .with_value(br#"{"version":2,"revision":1,"errors":{}}"#.as_slice()),
            opcode::SASL_LIST_MECHS => {
                Response::to(request, status::SUCCESS).with_value(b"SCRAM-SHA512 PLAIN".as_slice())
            }
            opcode::SASL_AUTH => self.sasl_auth(request),
            opcode::SASL_STEP => self.sasl_step(request),
            _ if self.user.is_none() => Response::to(request, status::EACCESS),
            opcode::SELECT_BUCKET => self.select_bucket(request),
            opcode::GET_CLUSTER_CONFIG => {
                let body = match &self.bucket {
                    Some(bucket) => config::bucket(self.port, 1, bucket),
                    None => config::cluster(self.port, 1),
                };
                let mut response = Response::to(request, status::SUCCESS).with_value(body);
                response.datatype = DATATYPE_JSON;
                response
            }
            opcode::GET | opcode::SET | opcode::ADD | opcode::REPLACE | opcode::DELETE => {
                self.document(request)
            }
            _ => Response::to(request, status::UNKNOWN_COMMAND),
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
                if user == self.server.username && password == self.server.password {
                    self.user = Some(user.to_owned());
                    Response::to(request, status::SUCCESS).with_value(b"Authenticated".as_slice())
                } else {
                    Response::to(request, status::AUTH_ERROR)
                }
            }
            SCRAM_SHA512 => {
                let server = &self.server;
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
        if self.store.has_bucket(&name) {
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
        let outcome = match request.opcode {
            opcode::GET => {
                return match self.store.get(&bucket, key) {
                    Ok(item) => Response {
                        cas: item.cas,
                        extras: item.flags.to_be_bytes().to_vec(),
                        datatype: if self.datatype { item.datatype } else { 0 },
                        ..Response::to(request, status::SUCCESS).with_value(item.value)
                    },
                    Err(status) => Response::to(request, status),
                };
            }
            opcode::DELETE => self.store.delete(&bucket, key, request.cas),
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
                self.store.mutate(&bucket, key, mode, request.cas, item)
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
