//! Where steps may send requests. An operator allows and denies destinations by CIDR or host
//! pattern (`--egress-allow`, `--egress-deny`); a step whose URL was rendered from the run's
//! input or from step outputs may not reach loopback, link-local or cloud metadata addresses
//! unless allowed, since whoever starts a run would otherwise choose where the definition's
//! headers go. Checked on the host before every request and redirect, and on every address a
//! name resolves to, in the resolver the connection uses: no second lookup an attacker's DNS
//! could answer differently.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// One `--egress-allow` or `--egress-deny` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address range: `10.0.0.0/8`, `::1/128`, or one address.
    Net(IpNet),
    /// A host name, exactly (`api.example.com`) or with its subdomains (`*.example.com`).
    Host(String),
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Destination::Net(net));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Destination::Net(IpNet::from(ip)));
        }
        let host = text.strip_prefix("*.").unwrap_or(text);
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if valid {
            Ok(Destination::Host(text.to_ascii_lowercase()))
        } else {
            Err(format!(
                "{text:?} is neither an address range (10.0.0.0/8), an address, nor a host name \
                 (api.example.com, *.example.com)"
            ))
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Net(net) => write!(f, "{net}"),
            Destination::Host(host) => f.write_str(host),
        }
    }
}

impl Destination {
    fn matches_host(&self, host: &str) -> bool {
        match self {
            Destination::Host(pattern) => match pattern.strip_prefix("*.") {
                Some(domain) => {
                    host.len() > domain.len() + 1
                        && host.ends_with(domain)
                        && host[..host.len() - domain.len()].ends_with('.')
                }
                None => host == pattern,
            },
            Destination::Net(_) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Destination::Net(net) if net.contains(&ip))
    }
}

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

impl Refused {
    pub fn new(why: impl Into<String>) -> Self {
        Refused(why.into())
    }
}

/// The operator's rules. An allow entry wins over any deny, explicit or default: to allow only
/// some hosts, deny everything (`0.0.0.0/0`, `::/0`) and allow those.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    pub allow: Vec<Destination>,
    pub deny: Vec<Destination>,
}

/// Addresses that reach the machine itself or its cloud's metadata service.
fn internal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("a link-local address (cloud metadata lives there)")
        }
        // Alibaba Cloud's metadata service.
        IpAddr::V4(v4) if v4.octets() == [100, 100, 100, 200] => Some("a cloud metadata address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        // AWS's metadata service over IPv6.
        IpAddr::V6(v6) if v6.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] => {
            Some("a cloud metadata address")
        }
        _ => None,
    }
}

/// An IPv4 address written as IPv6 is judged as the IPv4 one: mapped (`::ffff:127.0.0.1`) or
/// translated by NAT64 (`64:ff9b::127.0.0.1`).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d));
            }
            v6.to_ipv4_mapped().map_or(ip, IpAddr::V4)
        }
        v4 => v4,
    }
}

/// A host as compared: lower case, without brackets or the root's trailing dot.
fn normal(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl EgressPolicy {
    /// Whether an `--egress-allow` entry names this host (or its address, for a literal).
    pub fn allows(&self, host: &str) -> bool {
        let host = normal(host);
        let ip = host.parse::<IpAddr>().ok().map(canonical);
        self.allow
            .iter()
            .any(|d| d.matches_host(&host) || ip.is_some_and(|ip| d.matches_ip(ip)))
    }

    /// Whether the host part of a URL (a name, or an address literal) may be reached; names are
    /// checked again on the addresses they resolve to.
    pub fn check_host(&self, host: &str, from_input: bool) -> Result<(), Refused> {
        let host = normal(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.check_address(&host, ip, from_input);
        }
        if self.allow.iter().any(|d| d.matches_host(&host)) {
            return Ok(());
        }
        match self.deny.iter().find(|d| d.matches_host(&host)) {
            Some(rule) => Err(Refused(format!("{host} is denied by --egress-deny {rule}"))),
            None => Ok(()),
        }
    }

    /// Whether `ip`, an address of `host`, may be reached.
    pub fn check_address(&self, host: &str, ip: IpAddr, from_input: bool) -> Result<(), Refused> {
        let host = &normal(host);
        let ip = canonical(ip);
        if self
            .allow
            .iter()
            .any(|d| d.matches_ip(ip) || d.matches_host(host))
        {
            return Ok(());
        }
        if let Some(rule) = self.deny.iter().find(|d| d.matches_ip(ip)) {
            return Err(Refused(format!(
                "{host} ({ip}) is denied by --egress-deny {rule}"
            )));
        }
        match internal(ip) {
            Some(what) if from_input => Err(Refused(format!(
                "{host} ({ip}) is {what}, and this step's URL comes from the run's input or a \
                 step's output; an operator may allow it with --egress-allow"
            ))),
            _ => Ok(()),
        }
    }
}

/// A client whose connections go only where `policy` allows (for URLs rendered from run data:
/// `from_input`). It follows no redirect itself (a kind follows one through the policy, or none)
/// and uses no proxy, which would resolve names out of the policy's sight.
pub(crate) fn checked_client(
    policy: &Arc<EgressPolicy>,
    from_input: bool,
) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(CheckedResolver {
            policy: policy.clone(),
            from_input,
        }))
}

/// Resolves names with the system's resolver and keeps only the addresses the policy allows:
/// the connection uses exactly what was checked.
pub(crate) struct CheckedResolver {
    pub policy: Arc<EgressPolicy>,
    pub from_input: bool,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let from_input = self.from_input;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(
                    |addr| match policy.check_address(&host, addr.ip(), from_input) {
                        Ok(()) => true,
                        Err(e) => {
                            refused.get_or_insert(e);
                            false
                        }
                    },
                )
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(why)) => Err(why.into()),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy {
            allow: allow.iter().map(|d| d.parse().unwrap()).collect(),
            deny: deny.iter().map(|d| d.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn urls_from_input_may_not_reach_the_machine_or_its_metadata_service() {
        let p = EgressPolicy::default();
        for ip in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "fe80::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(p.check_address("h", ip, true).is_err(), "{ip}");
            assert!(p.check_address("h", ip, false).is_ok(), "{ip}");
        }
        assert!(
            p.check_address("h", "93.184.216.34".parse().unwrap(), true)
                .is_ok()
        );
        assert!(p.check_host("[::1]", true).is_err());
    }

    #[test]
    fn an_allow_entry_wins_over_every_deny() {
        let p = policy(
            &["127.0.0.1", "api.example.com"],
            &["0.0.0.0/0", "*.example.com"],
        );
        assert!(
            p.check_address("x", "127.0.0.1".parse().unwrap(), true)
                .is_ok()
        );
        assert!(
            p.check_address("x", "10.1.2.3".parse().unwrap(), false)
                .is_err()
        );
        assert!(p.check_host("api.example.com", false).is_ok());
        assert!(
            p.check_address("api.example.com", "10.1.2.3".parse().unwrap(), false)
                .is_ok()
        );
        assert!(p.check_host("www.example.com", false).is_err());
        assert!(
            p.check_host("www.example.com.", false).is_err(),
            "a trailing dot"
        );
        assert!(p.allows("API.example.com."));
        assert!(!p.allows("other.example.com"));
    }

    #[test]
    fn host_patterns_match_subdomains_only_on_a_label_boundary() {
        let d: Destination = "*.example.com".parse().unwrap();
        assert!(d.matches_host("a.example.com"));
        assert!(d.matches_host("a.b.example.com"));
        assert!(!d.matches_host("example.com"));
        assert!(!d.matches_host("badexample.com"));
        assert!("not a host!".parse::<Destination>().is_err());
        assert_eq!(
            "10.0.0.0/8".parse::<Destination>().unwrap(),
            Destination::Net("10.0.0.0/8".parse().unwrap())
        );
    }
}
