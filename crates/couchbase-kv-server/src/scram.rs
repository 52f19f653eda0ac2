//! The server side of SCRAM-SHA512 (RFC 5802, RFC 7677 with SHA-512), as
//! Couchbase Server runs it over SASL_AUTH and SASL_STEP.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha512};

/// A fine iteration count for a test server; real servers use more.
const ITERATIONS: u32 = 4096;

/// The state between the client's first and final message.
#[derive(Debug)]
pub struct Exchange {
    username: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    salted_password: Vec<u8>,
}

/// Why an exchange failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    WrongCredentials,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// PBKDF2-HMAC-SHA512 with one output block (64 bytes, the hash's size).
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut result = u.clone();
    for _ in 1..iterations {
        u = hmac(password, &u);
        result.iter_mut().zip(&u).for_each(|(r, x)| *r ^= x);
    }
    result
}

fn attribute(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        part.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

impl Exchange {
    /// Takes the client's first message (`n,,n=user,r=nonce`); returns the
    /// exchange and the server's first message. The salt is fresh each time,
    /// the password looked up by `password_of`.
    pub fn start(
        client_first: &str,
        password_of: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, String), Refusal> {
        let bare = client_first.strip_prefix("n,,").ok_or(Refusal::Malformed)?;
        let username = attribute(bare, 'n').ok_or(Refusal::Malformed)?.to_owned();
        let client_nonce = attribute(bare, 'r').ok_or(Refusal::Malformed)?;
        let salt: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let server_nonce: String = (0..24).map(|_| fastrand::alphanumeric()).collect();
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", BASE64.encode(salt));
        // An unknown user gets the same exchange, failing at the proof, so
        // the answer does not tell which usernames exist.
        let password = password_of(&username).unwrap_or_else(|| server_nonce.clone());
        let exchange = Self {
            username,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
            salted_password: salted_password(password.as_bytes(), &salt, ITERATIONS),
        };
        Ok((exchange, server_first))
    }

    /// Checks the client's final message (`c=biws,r=nonce,p=proof`); returns
    /// the authenticated user and the server's final message (`v=signature`).
    pub fn finish(self, client_final: &str) -> Result<(String, String), Refusal> {
        let proof = attribute(client_final, 'p').ok_or(Refusal::Malformed)?;
        let proof = BASE64.decode(proof).map_err(|_| Refusal::Malformed)?;
        if attribute(client_final, 'r') != Some(self.nonce.as_str()) {
            return Err(Refusal::WrongCredentials);
        }
        let without_proof = client_final
            .rsplit_once(",p=")
            .map(|(head, _)| head)
            .ok_or(Refusal::Malformed)?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_key = hmac(&self.salted_password, b"Client Key");
        let stored_key = Sha512::digest(&client_key);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(Refusal::WrongCredentials);
        }
        let recovered: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        if Sha512::digest(&recovered) != stored_key {
            return Err(Refusal::WrongCredentials);
        }
        let server_key = hmac(&self.salted_password, b"Server Key");
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        Ok((
            self.username,
            format!("v={}", BASE64.encode(server_signature)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client computing what RFC 5802 says it must.
    fn client_final(server_first: &str, password: &str, client_first_bare: &str) -> String {
        let nonce = attribute(server_first, 'r').unwrap();
        let salt = BASE64
            .decode(attribute(server_first, 's').unwrap())
            .unwrap();
        let iterations: u32 = attribute(server_first, 'i').unwrap().parse().unwrap();
        let salted = salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha512::digest(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        format!("{without_proof},p={}", BASE64.encode(proof))
    }

    fn lookup(user: &str) -> Option<String> {
        (user == "admin").then(|| "secret".to_owned())
    }

    #[test]
    fn the_right_password_authenticates_and_a_wrong_one_does_not() {
        for (password, expected) in [("secret", true), ("guess", false)] {
            let (exchange, server_first) = Exchange::start("n,,n=admin,r=abc", lookup).unwrap();
            let outcome = exchange.finish(&client_final(&server_first, password, "n=admin,r=abc"));
            assert_eq!(outcome.is_ok(), expected, "password {password:?}");
        }
    }

    #[test]
    fn pbkdf2_matches_the_rfc_7914_test_vector_shape() {
        // PBKDF2-HMAC-SHA512("password", "salt", 1) from RFC 6070-style vectors.
        let out = salted_password(b"password", b"salt", 1);
        assert_eq!(&out[..4], &[0x86, 0x7f, 0x70, 0xcf]);
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(
            Exchange::start("hello", lookup).err(),
            Some(Refusal::Malformed)
        );
    }
}
