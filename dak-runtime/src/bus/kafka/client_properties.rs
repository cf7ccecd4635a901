//! The librdkafka properties every Kafka client of dak gets besides its own:
//! TLS and SASL (`DAK_KAFKA_SECURITY_PROTOCOL` and the settings beside it) and
//! the operator's pass-through (`DAK_KAFKA_PROPERTIES`). Resolved and checked
//! once at start-up, so that a bad combination stops the process with a clear
//! message instead of making clients that cannot connect.

use std::fmt;
use std::path::Path;

use crate::config::KafkaArgs;

/// One librdkafka property. `Debug` hides the value of a secret one.
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl Property {
    fn new(key: &str, value: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            value: value.into(),
        }
    }
}

/// Whether a property's value is a credential: passwords, client secrets,
/// keys given inline, JAAS or OAUTHBEARER configurations.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "jaas", "oauthbearer.config", ".pem"]
        .iter()
        .any(|word| key.contains(word))
}

impl fmt::Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_secret(&self.key) {
            write!(f, "{}=[redacted]", self.key)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

/// Properties a pass-through may not set, and why: dak's guarantees rest on
/// some (DESIGN §6), others have a setting of their own, so that each thing
/// is set in one place and secrets stay out of the pass-through.
const REFUSED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set DAK_KAFKA_BROKERS"),
    ("metadata.broker.list", "set DAK_KAFKA_BROKERS"),
    ("security.protocol", "set DAK_KAFKA_SECURITY_PROTOCOL"),
    ("sasl.mechanism", "set DAK_KAFKA_SASL_MECHANISM"),
    ("sasl.mechanisms", "set DAK_KAFKA_SASL_MECHANISM"),
    ("sasl.username", "set DAK_KAFKA_SASL_USERNAME"),
    (
        "sasl.password",
        "set DAK_KAFKA_SASL_PASSWORD or DAK_KAFKA_SASL_PASSWORD_FILE",
    ),
    ("ssl.ca.location", "set DAK_KAFKA_SSL_CA_LOCATION"),
    (
        "ssl.certificate.location",
        "set DAK_KAFKA_SSL_CERTIFICATE_LOCATION",
    ),
    ("ssl.key.location", "set DAK_KAFKA_SSL_KEY_LOCATION"),
    ("ssl.key.password", "set DAK_KAFKA_SSL_KEY_PASSWORD"),
    ("linger.ms", "set DAK_KAFKA_LINGER_MS"),
    ("queue.buffering.max.ms", "set DAK_KAFKA_LINGER_MS"),
    ("fetch.wait.max.ms", "set DAK_KAFKA_FETCH_WAIT_MS"),
    ("session.timeout.ms", "set DAK_KAFKA_SESSION_TIMEOUT_MS"),
    (
        "enable.idempotence",
        "the idempotent producer keeps each key's records in order",
    ),
    (
        "acks",
        "`accepted` means every in-sync replica has the record (acks=all)",
    ),
    (
        "request.required.acks",
        "`accepted` means every in-sync replica has the record (acks=all)",
    ),
    (
        "enable.gapless.guarantee",
        "it stops the producer for good on one timed-out batch",
    ),
    ("group.id", "each service names its own consumer group"),
    (
        "enable.auto.commit",
        "offsets are committed only for records a handler finished",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed only for records a handler finished",
    ),
];

/// The properties `args` add to every client: security first, then the
/// pass-through. Errors name the setting to fix.
pub fn resolve(args: &KafkaArgs) -> Result<Vec<Property>, String> {
    let mut properties = security(args)?;
    if let Some(list) = &args.properties {
        for (key, value) in parse_pass_through(list.expose())? {
            if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| *refused == key) {
                return Err(format!("DAK_KAFKA_PROPERTIES may not set {key}: {why}"));
            }
            properties.push(Property::new(&key, value));
        }
    }
    Ok(properties)
}

/// `security.protocol` and the SASL and TLS properties that go with it.
fn security(args: &KafkaArgs) -> Result<Vec<Property>, String> {
    let protocol = args.security_protocol;
    let mut properties = vec![Property::new("security.protocol", protocol.as_str())];

    let sasl_settings = [
        ("DAK_KAFKA_SASL_MECHANISM", args.sasl_mechanism.is_some()),
        ("DAK_KAFKA_SASL_USERNAME", args.sasl_username.is_some()),
        ("DAK_KAFKA_SASL_PASSWORD", args.sasl_password.is_some()),
        (
            "DAK_KAFKA_SASL_PASSWORD_FILE",
            args.sasl_password_file.is_some(),
        ),
    ];
    if protocol.sasl() {
        let mechanism = args.sasl_mechanism.ok_or_else(|| {
            format!(
                "DAK_KAFKA_SECURITY_PROTOCOL={} needs DAK_KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                protocol.as_str()
            )
        })?;
        let username = args.sasl_username.as_deref().ok_or_else(|| {
            format!(
                "DAK_KAFKA_SECURITY_PROTOCOL={} needs DAK_KAFKA_SASL_USERNAME",
                protocol.as_str()
            )
        })?;
        let password = match (&args.sasl_password, &args.sasl_password_file) {
            (Some(password), None) => password.expose().to_owned(),
            (None, Some(path)) => read_password(path)?,
            (Some(_), Some(_)) => {
                return Err(
                    "set DAK_KAFKA_SASL_PASSWORD or DAK_KAFKA_SASL_PASSWORD_FILE, not both".into(),
                )
            }
            (None, None) => {
                return Err(format!(
                    "DAK_KAFKA_SECURITY_PROTOCOL={} needs DAK_KAFKA_SASL_PASSWORD or DAK_KAFKA_SASL_PASSWORD_FILE",
                    protocol.as_str()
                ))
            }
        };
        if username.is_empty() || password.is_empty() {
            return Err("the Kafka SASL username and password may not be empty".into());
        }
        properties.extend([
            Property::new("sasl.mechanism", mechanism.as_str()),
            Property::new("sasl.username", username),
            Property::new("sasl.password", password),
        ]);
    } else if let Some((name, _)) = sasl_settings.iter().find(|(_, set)| *set) {
        return Err(format!(
            "{name} is set, but DAK_KAFKA_SECURITY_PROTOCOL is {}: SASL needs sasl_plaintext or sasl_ssl",
            protocol.as_str()
        ));
    }

    let tls_files = [
        (
            "DAK_KAFKA_SSL_CA_LOCATION",
            "ssl.ca.location",
            &args.ssl_ca_location,
        ),
        (
            "DAK_KAFKA_SSL_CERTIFICATE_LOCATION",
            "ssl.certificate.location",
            &args.ssl_certificate_location,
        ),
        (
            "DAK_KAFKA_SSL_KEY_LOCATION",
            "ssl.key.location",
            &args.ssl_key_location,
        ),
    ];
    let tls_set = tls_files
        .iter()
        .filter(|(_, _, path)| path.is_some())
        .map(|(name, _, _)| *name)
        .chain(
            args.ssl_key_password
                .is_some()
                .then_some("DAK_KAFKA_SSL_KEY_PASSWORD"),
        )
        .next();
    if !protocol.tls() {
        return match tls_set {
            Some(name) => Err(format!(
                "{name} is set, but DAK_KAFKA_SECURITY_PROTOCOL is {}: TLS needs ssl or sasl_ssl",
                protocol.as_str()
            )),
            None => Ok(properties),
        };
    }
    if args.ssl_certificate_location.is_some() != args.ssl_key_location.is_some() {
        return Err(
            "a Kafka client certificate needs both DAK_KAFKA_SSL_CERTIFICATE_LOCATION and DAK_KAFKA_SSL_KEY_LOCATION"
                .into(),
        );
    }
    if args.ssl_key_password.is_some() && args.ssl_key_location.is_none() {
        return Err("DAK_KAFKA_SSL_KEY_PASSWORD is set without DAK_KAFKA_SSL_KEY_LOCATION".into());
    }
    for (name, key, path) in tls_files {
        if let Some(path) = path {
            if !path.exists() {
                return Err(format!("{name}: {} does not exist", path.display()));
            }
            properties.push(Property::new(key, path.to_string_lossy()));
        }
    }
    if let Some(password) = &args.ssl_key_password {
        properties.push(Property::new("ssl.key.password", password.expose()));
    }
    Ok(properties)
}

fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "DAK_KAFKA_SASL_PASSWORD_FILE: cannot read {}: {e}",
            path.display()
        )
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// `key=value[,key=value…]`. A piece without `=` continues the value before
/// it, so that librdkafka's own lists pass: `debug=broker,topic`.
fn parse_pass_through(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut properties: Vec<(String, String)> = Vec::new();
    for piece in list.split(',') {
        match piece.split_once('=') {
            Some((key, value)) => {
                let key = key.trim();
                if key.is_empty() {
                    return Err(format!(
                        "DAK_KAFKA_PROPERTIES: `{piece}` has no property name"
                    ));
                }
                if properties.iter().any(|(k, _)| k == key) {
                    return Err(format!("DAK_KAFKA_PROPERTIES sets {key} twice"));
                }
                properties.push((key.to_owned(), value.trim().to_owned()));
            }
            None if piece.trim().is_empty() => {}
            None => match properties.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(piece.trim());
                }
                None => return Err(format!("DAK_KAFKA_PROPERTIES: `{piece}` is not key=value")),
            },
        }
    }
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SaslMechanism, Secret};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn args(flags: &[&str]) -> KafkaArgs {
        let mut argv = vec!["dak"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().kafka
    }

    fn map(properties: &[Property]) -> Vec<(&str, &str)> {
        properties
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect()
    }

    #[test]
    fn kafka_args_default_is_what_no_flag_gives() {
        assert_eq!(
            format!("{:?}", KafkaArgs::default()),
            format!("{:?}", args(&[]))
        );
    }

    #[test]
    fn plaintext_by_default_and_nothing_else() {
        let resolved = resolve(&args(&[])).unwrap();
        assert_eq!(map(&resolved), [("security.protocol", "plaintext")]);
    }

    #[test]
    fn sasl_ssl_with_scram_maps_to_librdkafka_properties() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let ca_path = ca.path().to_str().unwrap();
        let resolved = resolve(&args(&[
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-sasl-mechanism",
            "scram-sha-512",
            "--kafka-sasl-username",
            "dak",
            "--kafka-sasl-password",
            "hunter2",
            "--kafka-ssl-ca-location",
            ca_path,
        ]))
        .unwrap();
        assert_eq!(
            map(&resolved),
            [
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "dak"),
                ("sasl.password", "hunter2"),
                ("ssl.ca.location", ca_path),
            ]
        );
    }

    #[test]
    fn the_password_comes_from_a_file_without_its_newline() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "s3cret\n").unwrap();
        let resolved = resolve(&args(&[
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "PLAIN",
            "--kafka-sasl-username",
            "dak",
            "--kafka-sasl-password-file",
            file.path().to_str().unwrap(),
        ]))
        .unwrap();
        assert!(map(&resolved).contains(&("sasl.password", "s3cret")));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let mut kafka = args(&[
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-256",
            "--kafka-sasl-username",
            "dak",
            "--kafka-properties",
            "sasl.oauthbearer.client.secret=abc123,client.id=dak-test",
        ]);
        kafka.sasl_password = Some(Secret::new("hunter2"));
        let shown = format!("{kafka:?} {:?}", resolve(&kafka).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("abc123"), "{shown}");
        assert!(shown.contains("client.id=dak-test"), "{shown}");
        assert!(shown.contains("sasl.password=[redacted]"), "{shown}");
    }

    #[test]
    fn bad_combinations_are_refused_with_the_setting_to_fix() {
        let refused = |flags: &[&str], says: &str| {
            let error = resolve(&args(flags)).unwrap_err();
            assert!(error.contains(says), "{flags:?}: {error}");
        };
        refused(
            &["--kafka-security-protocol", "sasl_ssl"],
            "needs DAK_KAFKA_SASL_MECHANISM",
        );
        refused(
            &[
                "--kafka-security-protocol",
                "sasl_ssl",
                "--kafka-sasl-mechanism",
                "PLAIN",
            ],
            "needs DAK_KAFKA_SASL_USERNAME",
        );
        refused(
            &[
                "--kafka-security-protocol",
                "sasl_ssl",
                "--kafka-sasl-mechanism",
                "PLAIN",
                "--kafka-sasl-username",
                "dak",
            ],
            "needs DAK_KAFKA_SASL_PASSWORD",
        );
        refused(
            &[
                "--kafka-security-protocol",
                "sasl_ssl",
                "--kafka-sasl-mechanism",
                "PLAIN",
                "--kafka-sasl-username",
                "dak",
                "--kafka-sasl-password",
                "p",
                "--kafka-sasl-password-file",
                "/etc/hostname",
            ],
            "not both",
        );
        refused(
            &["--kafka-sasl-username", "dak"],
            "DAK_KAFKA_SASL_USERNAME is set, but DAK_KAFKA_SECURITY_PROTOCOL is plaintext",
        );
        refused(
            &[
                "--kafka-security-protocol",
                "sasl_plaintext",
                "--kafka-sasl-mechanism",
                "PLAIN",
                "--kafka-sasl-username",
                "dak",
                "--kafka-sasl-password",
                "p",
                "--kafka-ssl-ca-location",
                "/etc/hostname",
            ],
            "DAK_KAFKA_SSL_CA_LOCATION is set, but DAK_KAFKA_SECURITY_PROTOCOL is sasl_plaintext",
        );
        refused(
            &[
                "--kafka-security-protocol",
                "ssl",
                "--kafka-ssl-certificate-location",
                "/etc/hostname",
            ],
            "needs both",
        );
        refused(
            &[
                "--kafka-security-protocol",
                "ssl",
                "--kafka-ssl-ca-location",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem does not exist",
        );
        refused(
            &["--kafka-sasl-password-file", "/nonexistent"],
            "DAK_KAFKA_SASL_PASSWORD_FILE is set",
        );
    }

    #[test]
    fn unknown_mechanisms_and_protocols_are_refused_by_the_parser() {
        let parse = |flags: &[&str]| {
            let mut argv = vec!["dak"];
            argv.extend_from_slice(flags);
            Cli::try_parse_from(argv).map(|c| c.kafka)
        };
        assert!(parse(&["--kafka-sasl-mechanism", "GSSAPI"]).is_err());
        assert!(parse(&["--kafka-security-protocol", "tls"]).is_err());
        assert_eq!(
            parse(&["--kafka-sasl-mechanism", "scram-sha-256"])
                .unwrap()
                .sasl_mechanism,
            Some(SaslMechanism::ScramSha256)
        );
    }

    #[test]
    fn pass_through_properties_keep_lists_and_refuse_what_dak_owns() {
        let resolved = resolve(&args(&[
            "--kafka-properties",
            "client.id=dak-1, debug=broker,topic,msg ,socket.keepalive.enable=true",
        ]))
        .unwrap();
        assert_eq!(
            map(&resolved),
            [
                ("security.protocol", "plaintext"),
                ("client.id", "dak-1"),
                ("debug", "broker,topic,msg"),
                ("socket.keepalive.enable", "true"),
            ]
        );
        for (list, says) in [
            ("acks=1", "may not set acks"),
            ("enable.idempotence=false", "may not set enable.idempotence"),
            ("sasl.password=x", "DAK_KAFKA_SASL_PASSWORD"),
            ("bootstrap.servers=a:1", "DAK_KAFKA_BROKERS"),
            ("linger.ms=5", "DAK_KAFKA_LINGER_MS"),
            ("broker", "is not key=value"),
            ("=1", "no property name"),
            ("client.id=a,client.id=b", "twice"),
        ] {
            let error = resolve(&args(&["--kafka-properties", list])).unwrap_err();
            assert!(error.contains(says), "{list}: {error}");
        }
    }
}
