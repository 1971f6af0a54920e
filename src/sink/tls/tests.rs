//! The verifier against two certificates made as ClickHouse's guide to
//! HTTPS makes them (`openssl req -x509 -newkey rsa:2048 -nodes -subj
//! /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost`, for
//! 100 years): as OpenSSL 3 does by default (`CA:TRUE`), and with
//! `-addext basicConstraints=critical,CA:FALSE`; and another CA
//! (`/CN=another CA`).

use super::*;

const CA_TRUE: &[u8] = include_bytes!("self-signed-ca.pem");
const CA_FALSE: &[u8] = include_bytes!("self-signed-leaf.pem");
const ANOTHER_CA: &[u8] = include_bytes!("another-ca.pem");

fn pem(bytes: &[u8]) -> Pem {
    Pem::from_bytes(bytes.to_vec())
}

fn pinned(ca: &[u8]) -> Pinned {
    let files = TlsFiles {
        ca: Some(pem(ca)),
        ..TlsFiles::default()
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    verifier(&files, provider)
        .expect("verifier")
        .expect("roots")
}

/// What `ca`'s verifier says of a server presenting `presented` as `name`
/// at `now`.
fn verdict(ca: &[u8], presented: &[u8], name: &str, now: UnixTime) -> Result<(), rustls::Error> {
    let cert = pem(presented).certs().expect("cert").remove(0);
    let name = ServerName::try_from(name.to_owned()).expect("name");
    pinned(ca)
        .verify_server_cert(&cert, &[], &name, &[], now)
        .map(drop)
}

fn reason(e: rustls::Error) -> String {
    let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    tls_reason(&io).expect("a TLS reason")
}

#[test]
fn a_self_signed_ca_certificate_in_the_ca_file_is_trusted_as_the_server_itself() {
    for name in ["localhost", "127.0.0.1"] {
        assert_eq!(verdict(CA_TRUE, CA_TRUE, name, UnixTime::now()), Ok(()));
    }
    // WebPKI alone refuses it: what the pin is for.
    let cert = pem(CA_TRUE).certs().expect("cert").remove(0);
    let name = ServerName::try_from("localhost").expect("name");
    let e = pinned(CA_TRUE)
        .webpki
        .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
        .expect_err("WebPKI refuses a CA as end entity");
    assert!(is_ca_used_as_end_entity(&e), "{e:?}");
    assert!(reason(e).starts_with("CA used as end entity"));
}

#[test]
fn a_ca_false_self_signed_certificate_needs_no_pin() {
    assert_eq!(
        verdict(CA_FALSE, CA_FALSE, "localhost", UnixTime::now()),
        Ok(())
    );
}

#[test]
fn a_pinned_certificate_still_has_its_name_checked() {
    let e = verdict(CA_TRUE, CA_TRUE, "elsewhere.example", UnixTime::now())
        .expect_err("a name the certificate is not for");
    let said = reason(e);
    assert!(said.starts_with("name mismatch"), "{said}");
    assert!(
        said.contains("localhost") && said.contains("elsewhere.example"),
        "{said}"
    );
}

#[test]
fn a_pinned_certificate_past_its_period_is_expired_not_trusted() {
    // 2200: WebPKI checks the period before the CA flag, so the pin never
    // sees an expired certificate (this test keeps that order true).
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(7_258_118_400));
    let e = verdict(CA_TRUE, CA_TRUE, "localhost", later).expect_err("expired");
    assert!(reason(e).contains("expired"));
}

#[test]
fn a_ca_certificate_the_ca_file_does_not_hold_is_refused_with_what_to_do() {
    let e = verdict(CA_FALSE, CA_TRUE, "localhost", UnixTime::now())
        .expect_err("not pinned, not signed by the CA file");
    let said = reason(e);
    assert!(said.starts_with("CA used as end entity"), "{said}");
    assert!(said.contains("the CA file"), "{said}");
}

#[test]
fn a_certificate_signed_by_no_root_held_is_an_unknown_issuer() {
    let e =
        verdict(ANOTHER_CA, CA_FALSE, "localhost", UnixTime::now()).expect_err("another issuer");
    let said = reason(e);
    assert!(said.starts_with("unknown issuer"), "{said}");
}

#[test]
fn check_config_counts_only_ca_certificates_as_pinned() {
    assert_eq!(pinned_self_signed(&pem(CA_TRUE)), 1);
    assert_eq!(pinned_self_signed(&pem(CA_FALSE)), 0);
    let both = [CA_TRUE, CA_FALSE].concat();
    assert_eq!(pinned_self_signed(&pem(&both)), 1);
}

#[test]
fn a_regenerated_certificate_under_the_same_name_is_a_bad_signature_said_so() {
    // Both are CN=localhost: the CA file names the issuer, whose key did
    // not sign what the server presents (the file holds an older one).
    let e = verdict(CA_TRUE, CA_FALSE, "localhost", UnixTime::now()).expect_err("other key");
    let said = reason(e);
    assert!(said.starts_with("bad signature"), "{said}");
}
