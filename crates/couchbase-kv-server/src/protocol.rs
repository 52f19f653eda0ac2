//! The memcached binary protocol as Couchbase speaks it: 24-byte headers,
//! framing extras (alt requests), extras, key and value, and the opcodes and
//! statuses this server knows.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const REQUEST: u8 = 0x80;
/// A request with framing extras ("alt request"), e.g. durability.
pub const ALT_REQUEST: u8 = 0x08;
pub const RESPONSE: u8 = 0x81;
const HEADER: usize = 24;
/// Frames above Couchbase Server's 30 MiB packet limit end the connection,
/// as there.
const MAX_BODY: usize = 30 << 20;
/// Couchbase Server's document size limit: larger values get E2BIG.
pub const MAX_VALUE: usize = 20 << 20;

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

    /// The opcodes that write a document.
    pub fn is_mutation(opcode: u8) -> bool {
        matches!(opcode, SET | ADD | REPLACE | DELETE)
    }
}

pub mod status {
    pub const SUCCESS: u16 = 0x00;
    pub const KEY_ENOENT: u16 = 0x01;
    pub const KEY_EEXISTS: u16 = 0x02;
    pub const TOO_BIG: u16 = 0x03;
    pub const INVALID_ARGUMENTS: u16 = 0x04;
    pub const NOT_MY_VBUCKET: u16 = 0x07;
    pub const NO_BUCKET: u16 = 0x08;
    pub const AUTH_ERROR: u16 = 0x20;
    pub const AUTH_CONTINUE: u16 = 0x21;
    pub const EACCESS: u16 = 0x24;
    pub const UNKNOWN_COMMAND: u16 = 0x81;
    pub const TMPFAIL: u16 = 0x86;
    pub const UNKNOWN_COLLECTION: u16 = 0x88;
    pub const DURABILITY_INVALID_LEVEL: u16 = 0xa0;
}

/// HELLO features this server agrees to when asked.
pub mod feature {
    pub const DATATYPE: u16 = 0x01;
    pub const XERROR: u16 = 0x07;
    pub const SELECT_BUCKET: u16 = 0x08;
    pub const JSON: u16 = 0x0b;
    /// Framing extras; the SDK sends durability only with this and the next.
    pub const ALT_REQUESTS: u16 = 0x10;
    pub const SYNC_REPLICATION: u16 = 0x11;
    pub const COLLECTIONS: u16 = 0x12;
    pub const SUPPORTED: [u16; 7] = [
        DATATYPE,
        XERROR,
        SELECT_BUCKET,
        JSON,
        ALT_REQUESTS,
        SYNC_REPLICATION,
        COLLECTIONS,
    ];
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
    /// Framing extras of an alt request (empty otherwise); see [`durability`].
    pub framing: Vec<u8>,
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
    // An alt request splits the key length field: framing extras, then key.
    let (framing_len, key_len) = match header[0] {
        REQUEST => (0, usize::from(u16::from_be_bytes([header[2], header[3]]))),
        ALT_REQUEST => (usize::from(header[2]), usize::from(header[3])),
        _ => return Err(invalid("not a request frame")),
    };
    let extras_len = usize::from(header[4]);
    let body_len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if body_len > MAX_BODY || framing_len + extras_len + key_len > body_len {
        return Err(invalid("inconsistent frame lengths"));
    }
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body).await?;
    let value = body.split_off(framing_len + extras_len + key_len);
    let key = body.split_off(framing_len + extras_len);
    let extras = body.split_off(framing_len);
    Ok(Some(Request {
        opcode: header[1],
        datatype: header[5],
        opaque: u32::from_be_bytes([header[12], header[13], header[14], header[15]]),
        cas: u64::from_be_bytes(
            header[16..24]
                .try_into()
                .map_err(|_| invalid("short header"))?,
        ),
        framing: body,
        extras,
        key,
        value,
    }))
}

/// Framing extras that do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedFraming;

/// The durability level (1 majority, 2 majority and persist on active,
/// 3 persist to majority) that a request's framing extras ask for, if any.
/// Other frames (on-behalf-of, preserve-TTL, …) are skipped.
pub fn durability(mut framing: &[u8]) -> Result<Option<u8>, MalformedFraming> {
    const DURABILITY: usize = 0x01;
    let mut level = None;
    while let Some((&head, rest)) = framing.split_first() {
        let (mut id, mut len, mut rest) = (usize::from(head >> 4), usize::from(head & 0x0f), rest);
        // A nibble of 15 means "15 plus the next byte".
        for field in [&mut id, &mut len] {
            if *field == 15 {
                let (&more, after) = rest.split_first().ok_or(MalformedFraming)?;
                *field += usize::from(more);
                rest = after;
            }
        }
        let body = rest.get(..len).ok_or(MalformedFraming)?;
        if id == DURABILITY {
            // The level, optionally followed by a 2-byte timeout in ms.
            match body {
                [l] | [l, _, _] => level = Some(*l),
                _ => return Err(MalformedFraming),
            }
        }
        framing = &rest[len..];
    }
    Ok(level)
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

    #[tokio::test]
    async fn alt_requests_carry_framing_extras_before_the_extras() {
        // Durability majority (frame 0x11 0x01), 8 bytes of extras, key "k", value "v".
        let mut frame = vec![ALT_REQUEST, opcode::SET, 2, 1, 8, 0, 0, 0];
        frame.extend_from_slice(&12u32.to_be_bytes());
        frame.extend_from_slice(&[0; 12]);
        frame.extend_from_slice(&[0x11, 0x01]);
        frame.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
        frame.extend_from_slice(b"kv");
        let request = read_request(&mut frame.as_slice()).await.unwrap().unwrap();
        assert_eq!(request.framing, [0x11, 0x01]);
        assert_eq!(request.extras, [0, 0, 0, 7, 0, 0, 0, 0]);
        assert_eq!(
            (request.key.as_slice(), request.value.as_slice()),
            (b"k".as_slice(), b"v".as_slice())
        );
        assert_eq!(durability(&request.framing), Ok(Some(1)));
    }

    #[test]
    fn durability_frames_decode_with_or_without_a_timeout() {
        assert_eq!(durability(&[]), Ok(None));
        assert_eq!(durability(&[0x13, 0x03, 0x01, 0xf4]), Ok(Some(3)));
        // On-behalf-of "ab", then durability: other frames are skipped.
        assert_eq!(durability(&[0x42, b'a', b'b', 0x11, 0x02]), Ok(Some(2)));
        // An escaped frame id (15 + 1) is not durability.
        assert_eq!(durability(&[0xf1, 0x01, 0x00]), Ok(None));
        assert_eq!(durability(&[0x12, 0x01]), Err(MalformedFraming));
        assert_eq!(durability(&[0x13, 0x01]), Err(MalformedFraming));
        assert_eq!(durability(&[0xf0]), Err(MalformedFraming));
    }
}
