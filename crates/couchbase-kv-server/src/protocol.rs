//! The memcached binary protocol as Couchbase speaks it: 24-byte headers,
//! extras, key and value, and the opcodes and statuses this server knows.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const REQUEST: u8 = 0x80;
pub const RESPONSE: u8 = 0x81;
const HEADER: usize = 24;
/// Refuses frames larger than Couchbase's 20 MiB document limit plus slack.
const MAX_BODY: usize = 21 << 20;

pub mod opcode {
    pub const GET: u8 = 0x00;
    pub const SET: u8 = 0x01;
    pub const ADD: u8 = 0x02;
    pub const REPLACE: u8 = 0x03;
    pub const DELETE: u8 = 0x04;
    pub const NOOP: u8 = 0x0a;
    pub const HELLO: u8 = 0x1f;
    pub const SASL_LIST_MECHS: u8 = 0x20;
    pub const SASL_AUTH: u8 = 0x21;
    pub const SASL_STEP: u8 = 0x22;
    pub const SELECT_BUCKET: u8 = 0x89;
    pub const GET_CLUSTER_CONFIG: u8 = 0xb5;
    pub const GET_ERROR_MAP: u8 = 0xfe;
}

pub mod status {
    pub const SUCCESS: u16 = 0x00;
    pub const KEY_ENOENT: u16 = 0x01;
    pub const KEY_EEXISTS: u16 = 0x02;
    pub const INVALID_ARGUMENTS: u16 = 0x04;
    pub const NO_BUCKET: u16 = 0x08;
    pub const AUTH_ERROR: u16 = 0x20;
    pub const AUTH_CONTINUE: u16 = 0x21;
    pub const EACCESS: u16 = 0x24;
    pub const UNKNOWN_COMMAND: u16 = 0x81;
    pub const UNKNOWN_COLLECTION: u16 = 0x88;
}

/// HELLO features this server agrees to when asked.
pub mod feature {
    pub const DATATYPE: u16 = 0x01;
    pub const XERROR: u16 = 0x07;
    pub const SELECT_BUCKET: u16 = 0x08;
    pub const JSON: u16 = 0x0b;
    pub const COLLECTIONS: u16 = 0x12;
    pub const SUPPORTED: [u16; 5] = [DATATYPE, XERROR, SELECT_BUCKET, JSON, COLLECTIONS];
}

/// The JSON datatype bit.
pub const DATATYPE_JSON: u8 = 0x01;

/// A request as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub opcode: u8,
    pub datatype: u8,
    pub opaque: u32,
    pub cas: u64,
    pub extras: Vec<u8>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A response to write back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub opcode: u8,
    pub status: u16,
    pub datatype: u8,
    pub opaque: u32,
    pub cas: u64,
    pub extras: Vec<u8>,
    pub value: Vec<u8>,
}

impl Response {
    pub fn to(request: &Request, status: u16) -> Self {
        Self {
            opcode: request.opcode,
            status,
            opaque: request.opaque,
            ..Self::default()
        }
    }

    pub fn with_value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = value.into();
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = self.extras.len() + self.value.len();
        let mut frame = Vec::with_capacity(HEADER + body);
        frame.push(RESPONSE);
        frame.push(self.opcode);
        frame.extend_from_slice(&0u16.to_be_bytes()); // responses carry no key
        frame.push(u8::try_from(self.extras.len()).unwrap_or(u8::MAX));
        frame.push(self.datatype);
        frame.extend_from_slice(&self.status.to_be_bytes());
        frame.extend_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&self.opaque.to_be_bytes());
        frame.extend_from_slice(&self.cas.to_be_bytes());
        frame.extend_from_slice(&self.extras);
        frame.extend_from_slice(&self.value);
        frame
    }
}

/// Reads one request; `Ok(None)` at a clean end of stream. A malformed frame
/// is an `InvalidData` error: the caller drops the connection.
pub async fn read_request(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Request>> {
    let mut header = [0u8; HEADER];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if header[0] != REQUEST {
        return Err(invalid("not a request frame"));
    }
    let key_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let extras_len = usize::from(header[4]);
    let body_len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if body_len > MAX_BODY || extras_len + key_len > body_len {
        return Err(invalid("inconsistent frame lengths"));
    }
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body).await?;
    let value = body.split_off(extras_len + key_len);
    let key = body.split_off(extras_len);
    Ok(Some(Request {
        opcode: header[1],
        datatype: header[5],
        opaque: u32::from_be_bytes([header[12], header[13], header[14], header[15]]),
        cas: u64::from_be_bytes(
            header[16..24]
                .try_into()
                .map_err(|_| invalid("short header"))?,
        ),
        extras: body,
        key,
        value,
    }))
}

/// Splits a LEB128 collection id off a key, as keys carry one when the
/// collections feature is on.
pub fn split_collection(key: &[u8]) -> Option<(u32, &[u8])> {
    let mut id: u32 = 0;
    for (i, byte) in key.iter().enumerate().take(5) {
        id |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((id, &key[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_ids_are_leb128() {
        assert_eq!(split_collection(b"\x00doc"), Some((0, b"doc".as_slice())));
        assert_eq!(
            split_collection(b"\x88\x01doc"),
            Some((136, b"doc".as_slice()))
        );
        assert_eq!(split_collection(b"\x80"), None);
    }

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_refused() {
        let mut frame = vec![
            REQUEST,
            opcode::GET,
            0,
            3,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            3,
            0,
            0,
            0,
            9,
        ];
        frame.extend_from_slice(&7u64.to_be_bytes());
        frame.extend_from_slice(b"abc");
        let request = read_request(&mut frame.as_slice()).await.unwrap().unwrap();
        assert_eq!(
            (
                request.opcode,
                request.opaque,
                request.cas,
                request.key.as_slice()
            ),
            (0, 9, 7, b"abc".as_slice())
        );
        let garbage = [0x42u8; 24];
        assert!(read_request(&mut garbage.as_slice()).await.is_err());
        assert_eq!(read_request(&mut [].as_slice()).await.unwrap(), None);
    }
}
