//! The cloud part of `vpcgate doctor`: which provider this VM runs on, read
//! from DMI only (never by probing the network), what its metadata service
//! says about the instance, and the provider's own forwarding switch. Also
//! the instance's public IPv4 address, which `vpcgate peer add` reads from
//! here when no public endpoint is set.
//!
//! What the metadata services expose (checked against each provider's
//! documentation and real responses):
//! - AWS IMDS (`/latest/meta-data/`, IMDSv2 token): instance id, region,
//!   MACs and per-interface ids, subnets and security groups, but not the
//!   source/destination check, which only the EC2 API reports
//!   (`describe-instance-attribute --attribute sourceDestCheck`).
//! - GCP (`/computeMetadata/v1/`, `Metadata-Flavor: Google`): name, zone,
//!   project, and per interface its IP, MAC, MTU, gateway and forwarded IPs,
//!   but not `canIpForward`, which only the Compute API reports.
//! - Azure IMDS (`/metadata/instance`, `Metadata: true`): name, resource
//!   group, subscription, and per interface its MAC and addresses, but not
//!   the NIC's IP forwarding flag nor even the NIC's resource name.
//!
//! So the switch itself cannot be read from inside the VM. What can be
//! known is whether it matters: with SNAT on (vpcgated's default) peer
//! traffic leaves with the VM's own address, which every provider lets
//! through with the switch in either position. With SNAT off, doctor says
//! it cannot check, and prints the console path and the CLI commands to
//! check and to fix it, filled in with the instance's ids from the metadata.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::http::{self, Endpoint, HttpError};
use super::{Check, Level};

/// Azure's chassis asset tag: the same on every Azure VM.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";
/// The link-local address all three providers serve metadata on.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Each request's limit; the services answer in milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// All of one provider's requests together.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The IMDSv2 token is used for a few seconds only.
const AWS_TOKEN_TTL: &str = "60";
const AZURE_API_VERSION: &str = "2021-02-01";
/// Where the public address is; see [`public_ipv4`].
const GCP_PUBLIC_IP: &str = "instance/network-interfaces/0/access-configs/0/external-ip";
const AZURE_PUBLIC_IP: &str =
    "/metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Aws,
    Gcp,
    Azure,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Aws => "AWS",
            Provider::Gcp => "GCP",
            Provider::Azure => "Azure",
        })
    }
}

impl Provider {
    /// The `subject` in doctor's output.
    pub fn id(&self) -> &'static str {
        match self {
            Provider::Aws => "aws",
            Provider::Gcp => "gcp",
            Provider::Azure => "azure",
        }
    }
}

/// The DMI strings that identify a cloud; a missing file reads as "".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dmi {
    pub sys_vendor: String,
    pub product_name: String,
    pub bios_vendor: String,
    pub bios_version: String,
    pub chassis_asset_tag: String,
    pub product_uuid: String,
}

impl Dmi {
    pub fn read(dir: &Path) -> Dmi {
        let field = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Dmi {
            sys_vendor: field("sys_vendor"),
            product_name: field("product_name"),
            bios_vendor: field("bios_vendor"),
            bios_version: field("bios_version"),
            chassis_asset_tag: field("chassis_asset_tag"),
            product_uuid: field("product_uuid"),
        }
    }
}

/// The provider DMI names, if any.
pub fn detect(dmi: &Dmi) -> Option<Provider> {
    if dmi.chassis_asset_tag == AZURE_ASSET_TAG {
        return Some(Provider::Azure);
    }
    if dmi.sys_vendor == "Google" || dmi.product_name == "Google Compute Engine" {
        return Some(Provider::Gcp);
    }
    if dmi.sys_vendor == "Amazon EC2" || dmi.bios_vendor == "Amazon EC2" {
        return Some(Provider::Aws);
    }
    // Older Xen instances: a generic Xen HVM guest whose UUID (or BIOS
    // version) gives EC2 away.
    let xen = dmi.bios_vendor == "Xen" || dmi.sys_vendor == "Xen";
    let ec2 = dmi.product_uuid.to_ascii_lowercase().starts_with("ec2")
        || dmi.bios_version.to_ascii_lowercase().contains("amazon");
    if xen && dmi.product_name == "HVM domU" && ec2 {
        return Some(Provider::Aws);
    }
    None
}

/// What doctor learned from the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instance {
    Aws {
        instance_id: String,
        region: String,
        /// The network interface (ENI) of the VPC-side NIC when it is not
        /// the primary one; the instance-level attribute covers only that.
        secondary_eni: Option<String>,
    },
    Gcp {
        name: String,
        zone: String,
        project: String,
    },
    Azure {
        name: String,
        resource_group: String,
        subscription: String,
        /// The VPC-side NIC's MAC as Azure's API spells it: 00-0D-3A-….
        mac: Option<String>,
    },
}

/// Metadata values end up in printed shell commands; only accept what ids,
/// names and zones are made of.
fn plain_value(value: &str, what: &str) -> Result<String, String> {
    let value = value.trim();
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!(
            "unexpected {what} {value:?} from the metadata service"
        ))
    }
}

/// One provider's requests, which share one deadline.
struct Session<'a> {
    endpoint: &'a Endpoint,
    deadline: Instant,
}

impl Session<'_> {
    fn new(endpoint: &Endpoint) -> Session<'_> {
        Session {
            endpoint,
            deadline: Instant::now() + TOTAL_TIMEOUT,
        }
    }

    /// One request, whatever status it answers.
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<http::Response, String> {
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .min(REQUEST_TIMEOUT);
        if left.is_zero() {
            return Err(format!("{} did not answer in time", self.endpoint.url()));
        }
        http::request(self.endpoint, method, path, headers, left)
            .map_err(|e: HttpError| e.to_string())
    }

    /// One request that must answer 200.
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<http::Response, String> {
        let response = self.send(method, path, headers)?;
        if response.status != 200 {
            return Err(format!("{method} {path} answered HTTP {}", response.status));
        }
        Ok(response)
    }

    /// IMDSv2: every read carries a token from this PUT.
    fn aws_token(&self) -> Result<String, String> {
        let token = self.call(
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", AWS_TOKEN_TTL)],
        )?;
        Ok(token.text().trim().to_string())
    }

    /// A GET under GCP's `/computeMetadata/v1/`, whatever status it answers.
    fn gcp(&self, path: &str) -> Result<http::Response, String> {
        let response = self.send(
            "GET",
            &format!("/computeMetadata/v1/{path}"),
            &[("Metadata-Flavor", "Google")],
        )?;
        // The real server always says so; anything else is not it.
        if response.header("Metadata-Flavor") != Some("Google") {
            return Err(format!(
                "{} is not GCP's metadata server (no Metadata-Flavor: Google in its answer)",
                self.endpoint.url()
            ));
        }
        Ok(response)
    }
}

/// Reads the instance's identity. `vpc_mac` is the MAC of the interface
/// that leads to the advertised ranges, lower case with colons.
pub fn fetch(
    provider: Provider,
    endpoint: &Endpoint,
    vpc_mac: Option<&str>,
) -> Result<Instance, String> {
    let session = Session::new(endpoint);
    match provider {
        Provider::Aws => {
            let token = session.aws_token()?;
            let get = |path: &str| {
                session
                    .call(
                        "GET",
                        &format!("/latest/meta-data/{path}"),
                        &[("X-aws-ec2-metadata-token", &token)],
                    )
                    .map(|r| r.text())
            };
            let instance_id = plain_value(&get("instance-id")?, "instance id")?;
            let region = match get("placement/region") {
                Ok(region) => plain_value(&region, "region")?,
                // Before 2019 only the zone was there: us-east-1a is in us-east-1.
                Err(_) => {
                    let zone = plain_value(&get("placement/availability-zone")?, "zone")?;
                    zone.trim_end_matches(|c: char| c.is_ascii_lowercase())
                        .to_string()
                }
            };
            let primary = get("mac").ok().map(|m| m.trim().to_ascii_lowercase());
            let secondary_eni = match vpc_mac {
                Some(mac) if primary.as_deref() != Some(mac) => {
                    get(&format!("network/interfaces/macs/{mac}/interface-id"))
                        .ok()
                        .and_then(|eni| plain_value(&eni, "interface id").ok())
                }
                _ => None,
            };
            Ok(Instance::Aws {
                instance_id,
                region,
                secondary_eni,
            })
        }
        Provider::Gcp => {
            let get = |path: &str| -> Result<String, String> {
                let r = session.gcp(path)?;
                if r.status != 200 {
                    return Err(format!(
                        "GET /computeMetadata/v1/{path} answered HTTP {}",
                        r.status
                    ));
                }
                Ok(r.text())
            };
            let name = plain_value(&get("instance/name")?, "instance name")?;
            let zone = get("instance/zone")?;
            // projects/123456789/zones/us-central1-a
            let zone = plain_value(zone.trim().rsplit('/').next().unwrap_or(""), "zone")?;
            let project = plain_value(&get("project/project-id")?, "project id")?;
            Ok(Instance::Gcp {
                name,
                zone,
                project,
            })
        }
        Provider::Azure => {
            let path = format!("/metadata/instance?api-version={AZURE_API_VERSION}");
            let body = session.call("GET", &path, &[("Metadata", "true")])?.text();
            parse_azure(&body, vpc_mac)
        }
    }
}

/// Azure's instance document: `compute` names the VM, `network.interface`
/// lists MACs as 12 upper-case hex digits.
pub fn parse_azure(body: &str, vpc_mac: Option<&str>) -> Result<Instance, String> {
    let doc: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("Azure metadata is not JSON: {e}"))?;
    let compute = &doc["compute"];
    let field = |name: &str| {
        compute[name]
            .as_str()
            .ok_or_else(|| format!("Azure metadata has no compute.{name}"))
            .and_then(|v| plain_value(v, name))
    };
    let name = field("name")?;
    let resource_group = field("resourceGroupName")?;
    let subscription = field("subscriptionId")?;
    let macs: Vec<String> = doc["network"]["interface"]
        .as_array()
        .map(|nics| {
            nics.iter()
                .filter_map(|nic| nic["macAddress"].as_str())
                .filter_map(|mac| {
                    let hex: String = mac.chars().filter(char::is_ascii_hexdigit).collect();
                    (hex.len() == 12).then(|| hex.to_ascii_uppercase())
                })
                .collect()
        })
        .unwrap_or_default();
    let wanted = vpc_mac.map(|m| m.replace(':', "").to_ascii_uppercase());
    let mac = match wanted {
        Some(w) if macs.contains(&w) => Some(w),
        _ => macs.first().cloned(),
    };
    let mac = mac.map(|hex| {
        hex.as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    });
    Ok(Instance::Azure {
        name,
        resource_group,
        subscription,
        mac,
    })
}

/// The instance's public IPv4 address, for `peer add` when no public
/// endpoint is set. Where each provider keeps it:
/// - AWS: `public-ipv4`, absent (404) when the instance has none.
/// - GCP: the first NIC's first access config's `external-ip`; no access
///   config (no external address) is a 404.
/// - Azure: the first NIC's first IP configuration's `publicIpAddress`,
///   as plain text with `format=text`. Azure fills it only for Basic-SKU
///   public IPs: for a Standard-SKU one it is empty (Microsoft's answer in
///   MicrosoftDocs/azure-docs#44314; kubernetes-sigs/cloud-provider-azure#535
///   and siderolabs/talos#4150 report the same).
pub fn public_ipv4(provider: Provider, endpoint: &Endpoint) -> Result<Ipv4Addr, String> {
    let session = Session::new(endpoint);
    let response = match provider {
        Provider::Aws => {
            let token = session.aws_token()?;
            session.send(
                "GET",
                "/latest/meta-data/public-ipv4",
                &[("X-aws-ec2-metadata-token", &token)],
            )?
        }
        Provider::Gcp => session.gcp(GCP_PUBLIC_IP)?,
        Provider::Azure => session.send(
            "GET",
            &format!("{AZURE_PUBLIC_IP}?api-version={AZURE_API_VERSION}&format=text"),
            &[("Metadata", "true")],
        )?,
    };
    parse_public_ipv4(provider, response.status, &response.body)
}

/// How much of an unexpected answer an error shows.
const SHOWN_CHARS: usize = 64;

/// Checks what the metadata service answered for the public address; the
/// error says why it is not one, quoting the answer.
pub fn parse_public_ipv4(provider: Provider, status: u16, body: &[u8]) -> Result<Ipv4Addr, String> {
    let none = match provider {
        Provider::Azure => {
            "it lists no public IPv4 address for the first network interface: the VM has none, \
             or a Standard-SKU one, which Azure's metadata service does not show"
        }
        Provider::Aws | Provider::Gcp => "this instance has no public IPv4 address",
    };
    if status == 404 {
        return Err(format!("{none} (HTTP 404)"));
    }
    if status != 200 {
        return Err(format!("it answered HTTP {status}"));
    }
    let shown = || {
        let text = String::from_utf8_lossy(body);
        let mut chars = text.chars();
        let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
        let cut = if chars.next().is_some() { "…" } else { "" };
        format!("{head:?}{cut}")
    };
    let text = std::str::from_utf8(body)
        .map_err(|_| format!("it answered {}, which is not an IPv4 address", shown()))?;
    // Only the line break a text answer may end with; spaces inside or
    // around the address are not an address.
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return Err(none.to_string());
    }
    let ip: Ipv4Addr = text
        .parse()
        .map_err(|_| format!("it answered {}, which is not an IPv4 address", shown()))?;
    match unreachable_kind(ip) {
        Some(kind) => Err(format!(
            "it answered {ip}, {kind}, which clients on the internet cannot reach"
        )),
        None => Ok(ip),
    }
}

/// What kind of address `ip` is when clients on the internet cannot reach
/// it (after IANA's special-purpose registry), or `None` for a public one.
/// RFC 5737's documentation ranges (192.0.2.0/24, 198.51.100.0/24,
/// 203.0.113.0/24) pass on purpose: no provider hands them out, so only an
/// example or a test's fake service answers one, and refusing them would
/// make those use somebody's real address.
fn unreachable_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "an address in 0.0.0.0/8 (\"this network\")",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "a private address (RFC 1918)",
        (100, 64..=127, _) => "a shared carrier-grade NAT address (100.64.0.0/10)",
        (127, ..) => "a loopback address",
        (169, 254, _) => "a link-local address",
        (192, 0, 0) => "an IETF protocol address (192.0.0.0/24)",
        (198, 18..=19, _) => "a benchmarking address (198.18.0.0/15)",
        (224..=239, ..) => "a multicast address",
        (240.., ..) => "a reserved address (240.0.0.0/4)",
        _ => return None,
    })
}

/// The `cloud` line: which provider, and whether its metadata answered.
pub fn detection(
    dmi: &Dmi,
    provider: Option<Provider>,
    instance: Option<&Result<Instance, String>>,
    endpoint: &str,
) -> Check {
    let id = "cloud";
    let Some(provider) = provider else {
        let vendor = if dmi.sys_vendor.is_empty() {
            "no DMI vendor".to_string()
        } else {
            format!("DMI vendor {:?}", dmi.sys_vendor)
        };
        return Check::new(id, Level::Ok, format!("not an AWS, GCP or Azure VM ({vendor}), so there is no provider forwarding switch to check"));
    };
    let check = match instance {
        Some(Ok(instance)) => Check::new(
            id,
            Level::Ok,
            format!(
                "{provider} VM ({}), from DMI and its metadata service at {endpoint}",
                describe(instance)
            ),
        ),
        Some(Err(e)) => {
            let check = Check::new(
                id,
                Level::Warn,
                format!("{provider} VM (from DMI), but its metadata service at {endpoint} did not answer as expected: {e}; the commands below carry placeholders"),
            );
            match provider {
                Provider::Aws => check.fix("aws ec2 modify-instance-metadata-options --instance-id <instance id> --http-endpoint enabled  # if the metadata service is off".to_string()),
                _ => check.fix(format!("make sure nothing on this VM blocks {endpoint} (firewall rules, routes)")),
            }
        }
        None => Check::new(id, Level::Ok, format!("{provider} VM (from DMI)")),
    };
    check.subject(provider.id().to_string())
}

fn describe(instance: &Instance) -> String {
    match instance {
        Instance::Aws {
            instance_id,
            region,
            ..
        } => format!("instance {instance_id} in {region}"),
        Instance::Gcp {
            name,
            zone,
            project,
        } => format!("instance {name} in {zone}, project {project}"),
        Instance::Azure {
            name,
            resource_group,
            ..
        } => format!("VM {name} in resource group {resource_group}"),
    }
}

/// The provider's forwarding switch. `snat` is vpcgated's setting (None when
/// the daemon did not answer); `tunnel` the tunnel networks, which the VPC
/// must route to this VM when SNAT is off.
pub fn forwarding_switch(
    provider: Provider,
    instance: Option<&Instance>,
    snat: Option<bool>,
    tunnel: &[String],
) -> Check {
    let id = "cloud_forwarding";
    let switch = match provider {
        Provider::Aws => "the source/destination check",
        Provider::Gcp => "IP forwarding (canIpForward)",
        Provider::Azure => "IP forwarding on the NIC",
    };
    if snat == Some(true) {
        return Check::new(
            id,
            Level::Ok,
            format!("{provider}'s {switch} does not matter while SNAT is on: peer traffic leaves with this VM's own address; run doctor again before `vpcgate set --snat off`"),
        )
        .subject(provider.id().to_string());
    }
    let why = match snat {
        Some(_) => "SNAT is off, so forwarded packets keep the peers' addresses".to_string(),
        None => "vpcgated did not say whether SNAT is on; with it off, forwarded packets keep the peers' addresses".to_string(),
    };
    let what = match provider {
        Provider::Aws => "AWS drops them unless the instance's source/destination check is off",
        Provider::Gcp => "GCP drops them unless the VM was allowed to forward IP (canIpForward)",
        Provider::Azure => "Azure drops them unless IP forwarding is enabled on the NIC",
    };
    let mut check = Check::new(
        id,
        Level::Warn,
        format!("{why}, and {what}; {provider}'s metadata service does not expose that setting, so it cannot be checked from inside the VM"),
    );
    for line in provider_commands(provider, instance) {
        check = check.fix(line);
    }
    let networks = if tunnel.is_empty() {
        "the tunnel network".to_string()
    } else {
        tunnel.join(", ")
    };
    check
        .fix(format!(
            "with SNAT off the VPC (and a peered network) must also route {networks} to this VM"
        ))
        .fix("or turn SNAT back on, which needs none of this: vpcgate set --snat on".to_string())
        .subject(provider.id().to_string())
}

fn provider_commands(provider: Provider, instance: Option<&Instance>) -> Vec<String> {
    match (provider, instance) {
        (Provider::Aws, Some(Instance::Aws { instance_id, region, secondary_eni })) => match secondary_eni {
            None => vec![
                format!("check: aws ec2 describe-instance-attribute --region {region} --instance-id {instance_id} --attribute sourceDestCheck"),
                format!("fix: aws ec2 modify-instance-attribute --region {region} --instance-id {instance_id} --no-source-dest-check"),
                format!("console: EC2 → Instances → {instance_id} → Actions → Networking → Change source/destination check → Stop → Save"),
            ],
            Some(eni) => vec![
                format!("check: aws ec2 describe-network-interface-attribute --region {region} --network-interface-id {eni} --attribute sourceDestCheck"),
                format!("fix: aws ec2 modify-network-interface-attribute --region {region} --network-interface-id {eni} --no-source-dest-check"),
                format!("console: EC2 → Network interfaces → {eni} → Actions → Change source/dest. check → Disable → Save"),
            ],
        },
        (Provider::Aws, _) => vec![
            "check: aws ec2 describe-instance-attribute --instance-id <instance id> --attribute sourceDestCheck".to_string(),
            "fix: aws ec2 modify-instance-attribute --instance-id <instance id> --no-source-dest-check".to_string(),
            "console: EC2 → Instances → this instance → Actions → Networking → Change source/destination check → Stop → Save".to_string(),
        ],
        (Provider::Gcp, instance) => {
            let (name, zone, project) = match instance {
                Some(Instance::Gcp { name, zone, project }) => (name.as_str(), zone.as_str(), project.as_str()),
                _ => ("<instance name>", "<zone>", "<project>"),
            };
            let at = format!("--zone {zone} --project {project}");
            vec![
                format!("check: gcloud compute instances describe {name} {at} --format='value(canIpForward)'"),
                format!("fix: gcloud compute instances export {name} {at} --destination {name}.yaml, set canIpForward: true in it, then gcloud compute instances update-from-file {name} {at} --source {name}.yaml --most-disruptive-allowed-action RESTART (this restarts the VM; where that is refused, recreate it with --can-ip-forward)"),
                format!("console: Compute Engine → VM instances → {name} → Network interfaces → IP forwarding shows On or Off"),
            ]
        }
        (Provider::Azure, instance) => {
            let (name, group, subscription, mac) = match instance {
                Some(Instance::Azure { name, resource_group, subscription, mac }) => (
                    name.as_str(),
                    resource_group.as_str(),
                    subscription.as_str(),
                    mac.as_deref().unwrap_or("<NIC MAC>"),
                ),
                _ => ("<VM name>", "<resource group>", "<subscription>", "<NIC MAC>"),
            };
            let scope = format!("--subscription {subscription} --resource-group {group}");
            let query = format!("[?macAddress=='{mac}']");
            vec![
                format!("check: az network nic list {scope} --query \"{query}.{{name:name,ipForwarding:enableIPForwarding}}\" --output table"),
                format!("fix: az network nic update --ip-forwarding true --ids $(az network nic list {scope} --query \"{query}.id\" --output tsv)"),
                format!("console: Virtual machines → {name} → Networking → the network interface → IP configurations → IP forwarding: Enabled → Save"),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dmi(sys_vendor: &str, product_name: &str, bios_vendor: &str) -> Dmi {
        Dmi {
            sys_vendor: sys_vendor.into(),
            product_name: product_name.into(),
            bios_vendor: bios_vendor.into(),
            ..Dmi::default()
        }
    }

    #[test]
    fn detects_each_provider_from_dmi() {
        assert_eq!(
            detect(&dmi("Amazon EC2", "t4g.nano", "Amazon EC2")),
            Some(Provider::Aws)
        );
        assert_eq!(detect(&dmi("", "", "Amazon EC2")), Some(Provider::Aws));
        let xen = Dmi {
            product_uuid: "EC2E1916-9099-7CAF-FD21-012345678901".into(),
            ..dmi("Xen", "HVM domU", "Xen")
        };
        assert_eq!(detect(&xen), Some(Provider::Aws));
        let xen_by_bios = Dmi {
            bios_version: "4.11.amazon".into(),
            ..dmi("Xen", "HVM domU", "Xen")
        };
        assert_eq!(detect(&xen_by_bios), Some(Provider::Aws));
        // Any other Xen guest is not EC2.
        let other_xen = Dmi {
            product_uuid: "4f0e3a2c-0000-0000-0000-000000000000".into(),
            ..dmi("Xen", "HVM domU", "Xen")
        };
        assert_eq!(detect(&other_xen), None);

        assert_eq!(
            detect(&dmi("Google", "Google Compute Engine", "Google")),
            Some(Provider::Gcp)
        );
        assert_eq!(
            detect(&dmi("", "Google Compute Engine", "")),
            Some(Provider::Gcp)
        );

        let azure = Dmi {
            chassis_asset_tag: AZURE_ASSET_TAG.into(),
            ..dmi(
                "Microsoft Corporation",
                "Virtual Machine",
                "Microsoft Corporation",
            )
        };
        assert_eq!(detect(&azure), Some(Provider::Azure));
        // Hyper-V on premises says the same except for the asset tag.
        assert_eq!(
            detect(&dmi(
                "Microsoft Corporation",
                "Virtual Machine",
                "Microsoft Corporation"
            )),
            None
        );

        assert_eq!(
            detect(&dmi("QEMU", "Standard PC (Q35 + ICH9, 2009)", "SeaBIOS")),
            None
        );
        assert_eq!(detect(&Dmi::default()), None);
    }

    #[test]
    fn reads_dmi_fixture_directories() {
        let dir = std::env::temp_dir().join(format!("vpcgate-doctor-dmi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("sys_vendor"), "Microsoft Corporation\n").expect("write");
        std::fs::write(
            dir.join("chassis_asset_tag"),
            format!("{AZURE_ASSET_TAG}\n"),
        )
        .expect("write");
        let read = Dmi::read(&dir);
        assert_eq!(read.sys_vendor, "Microsoft Corporation");
        assert_eq!(read.product_name, "", "a missing file reads as empty");
        assert_eq!(detect(&read), Some(Provider::Azure));
        assert_eq!(Dmi::read(&dir.join("absent")), Dmi::default());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    const AZURE_DOC: &str = r#"{
        "compute": {"name": "gw-vm", "resourceGroupName": "net-rg", "subscriptionId": "8d10da13-8125-4ba9-a717-bf7490507b3d", "location": "westeurope", "vmId": "x"},
        "network": {"interface": [
            {"ipv4": {"ipAddress": [{"privateIpAddress": "198.18.64.10", "publicIpAddress": ""}], "subnet": [{"address": "198.18.64.0", "prefix": "20"}]}, "ipv6": {"ipAddress": []}, "macAddress": "000D3A1B2C3D"},
            {"ipv4": {"ipAddress": []}, "ipv6": {"ipAddress": []}, "macAddress": "000D3AFFEE01"}
        ]}
    }"#;

    #[test]
    fn parses_azure_metadata_and_picks_the_vpc_nic() {
        let Ok(Instance::Azure {
            name,
            resource_group,
            subscription,
            mac,
        }) = parse_azure(AZURE_DOC, Some("00:0d:3a:ff:ee:01"))
        else {
            panic!("parse failed");
        };
        assert_eq!(
            (name.as_str(), resource_group.as_str()),
            ("gw-vm", "net-rg")
        );
        assert_eq!(subscription, "8d10da13-8125-4ba9-a717-bf7490507b3d");
        assert_eq!(mac.as_deref(), Some("00-0D-3A-FF-EE-01"));
        let Ok(Instance::Azure { mac, .. }) = parse_azure(AZURE_DOC, Some("02:00:00:00:00:99"))
        else {
            panic!("parse failed");
        };
        assert_eq!(
            mac.as_deref(),
            Some("00-0D-3A-1B-2C-3D"),
            "unknown MAC: the first NIC"
        );
        assert!(parse_azure("{}", None).is_err());
        assert!(parse_azure("not json", None).is_err());
        let hostile = AZURE_DOC.replace("net-rg", "rg; rm -rf /");
        assert!(parse_azure(&hostile, None).is_err_and(|e| e.contains("unexpected")));
    }

    #[test]
    fn metadata_values_must_be_plain() {
        assert_eq!(
            plain_value("i-0123456789abcdef0\n", "id"),
            Ok("i-0123456789abcdef0".into())
        );
        assert!(plain_value("", "id").is_err());
        assert!(plain_value("$(reboot)", "id").is_err());
        assert!(plain_value("a b", "id").is_err());
    }

    fn aws() -> Instance {
        Instance::Aws {
            instance_id: "i-0123456789abcdef0".into(),
            region: "eu-west-1".into(),
            secondary_eni: None,
        }
    }

    #[test]
    fn snat_on_means_the_switch_does_not_matter() {
        for provider in [Provider::Aws, Provider::Gcp, Provider::Azure] {
            let check = forwarding_switch(provider, None, Some(true), &[]);
            assert_eq!(check.status, Level::Ok, "{provider}");
            assert!(check.fix.is_empty());
            assert!(check.message.contains("SNAT is on"), "{}", check.message);
        }
    }

    #[test]
    fn snat_off_gives_commands_with_the_instance_ids() {
        let tunnel = ["100.64.0.0/24".to_string()];
        let check = forwarding_switch(Provider::Aws, Some(&aws()), Some(false), &tunnel);
        assert_eq!(check.status, Level::Warn);
        assert_eq!(check.subject.as_deref(), Some("aws"));
        assert!(
            check
                .message
                .contains("cannot be checked from inside the VM"),
            "{}",
            check.message
        );
        assert!(check.fix.contains(&"fix: aws ec2 modify-instance-attribute --region eu-west-1 --instance-id i-0123456789abcdef0 --no-source-dest-check".to_string()), "{:?}", check.fix);
        assert!(check
            .fix
            .iter()
            .any(|f| f.contains("--attribute sourceDestCheck")));
        assert!(check
            .fix
            .iter()
            .any(|f| f.starts_with("console: EC2 → Instances → i-0123456789abcdef0")));
        assert!(check.fix.iter().any(|f| f.contains("100.64.0.0/24")));
        assert!(check
            .fix
            .iter()
            .any(|f| f.contains("vpcgate set --snat on")));

        let eni = Instance::Aws {
            instance_id: "i-0123456789abcdef0".into(),
            region: "eu-west-1".into(),
            secondary_eni: Some("eni-0a1b2c3d4e5f60718".into()),
        };
        let check = forwarding_switch(Provider::Aws, Some(&eni), Some(false), &tunnel);
        assert!(check.fix.iter().any(|f| f.contains("modify-network-interface-attribute --region eu-west-1 --network-interface-id eni-0a1b2c3d4e5f60718 --no-source-dest-check")), "{:?}", check.fix);

        let gcp = Instance::Gcp {
            name: "gw-1".into(),
            zone: "us-central1-a".into(),
            project: "proj-x".into(),
        };
        let check = forwarding_switch(Provider::Gcp, Some(&gcp), Some(false), &tunnel);
        assert!(check.fix.contains(&"check: gcloud compute instances describe gw-1 --zone us-central1-a --project proj-x --format='value(canIpForward)'".to_string()), "{:?}", check.fix);
        assert!(check
            .fix
            .iter()
            .any(|f| f.contains("update-from-file gw-1")));

        let azure = parse_azure(AZURE_DOC, None).expect("parse");
        let check = forwarding_switch(Provider::Azure, Some(&azure), Some(false), &tunnel);
        assert!(check.fix.iter().any(|f| f.starts_with("fix: az network nic update --ip-forwarding true --ids $(az network nic list --subscription 8d10da13-8125-4ba9-a717-bf7490507b3d --resource-group net-rg --query \"[?macAddress=='00-0D-3A-1B-2C-3D'].id\"")), "{:?}", check.fix);
        assert!(check
            .fix
            .iter()
            .any(|f| f.contains("Virtual machines → gw-vm → Networking")));
    }

    #[test]
    fn unknown_snat_or_metadata_still_advises_with_placeholders() {
        let check = forwarding_switch(Provider::Aws, None, None, &[]);
        assert_eq!(check.status, Level::Warn);
        assert!(
            check.message.contains("did not say whether SNAT is on"),
            "{}",
            check.message
        );
        assert!(check
            .fix
            .iter()
            .any(|f| f.contains("--instance-id <instance id> --no-source-dest-check")));
        let check = forwarding_switch(Provider::Gcp, None, Some(false), &[]);
        assert!(check
            .fix
            .iter()
            .any(|f| f.contains("describe <instance name> --zone <zone> --project <project>")));
        let check = forwarding_switch(Provider::Azure, None, Some(false), &[]);
        assert!(check.fix.iter().any(|f| f.contains("<resource group>")));
    }

    const PROVIDERS: [Provider; 3] = [Provider::Aws, Provider::Gcp, Provider::Azure];

    #[test]
    fn a_public_address_is_taken() {
        for provider in PROVIDERS {
            for (answer, ip) in [
                (&b"34.120.5.9"[..], Ipv4Addr::new(34, 120, 5, 9)),
                (b"52.18.0.7\n", Ipv4Addr::new(52, 18, 0, 7)),
                // Documentation addresses pass (see unreachable_kind).
                (b"203.0.113.7", Ipv4Addr::new(203, 0, 113, 7)),
                // The neighbours of the refused ranges are public.
                (b"172.15.255.255", Ipv4Addr::new(172, 15, 255, 255)),
                (b"172.32.0.1", Ipv4Addr::new(172, 32, 0, 1)),
                (b"100.63.255.255", Ipv4Addr::new(100, 63, 255, 255)),
                (b"100.128.0.1", Ipv4Addr::new(100, 128, 0, 1)),
                (b"198.17.255.255", Ipv4Addr::new(198, 17, 255, 255)),
                (b"198.20.0.1", Ipv4Addr::new(198, 20, 0, 1)),
                (b"192.0.1.1", Ipv4Addr::new(192, 0, 1, 1)),
                (b"223.255.255.254", Ipv4Addr::new(223, 255, 255, 254)),
            ] {
                assert_eq!(
                    parse_public_ipv4(provider, 200, answer),
                    Ok(ip),
                    "{provider}"
                );
            }
        }
    }

    #[test]
    fn an_address_the_internet_cannot_reach_is_refused_by_kind() {
        for provider in PROVIDERS {
            for (answer, kind) in [
                ("10.0.8.5", "private address (RFC 1918)"),
                ("172.16.0.4", "private address (RFC 1918)"),
                ("172.31.255.1", "private address (RFC 1918)"),
                ("192.168.1.20", "private address (RFC 1918)"),
                ("100.64.0.1", "carrier-grade NAT"),
                ("100.127.255.254", "carrier-grade NAT"),
                ("169.254.169.254", "link-local"),
                ("127.0.0.1", "loopback"),
                ("0.0.0.0", "this network"),
                ("192.0.0.8", "IETF protocol"),
                ("198.18.64.10", "benchmarking"),
                ("198.19.255.255", "benchmarking"),
                ("224.0.0.1", "multicast"),
                ("239.255.255.250", "multicast"),
                ("240.0.0.1", "reserved"),
                ("255.255.255.255", "reserved"),
            ] {
                let err = parse_public_ipv4(provider, 200, answer.as_bytes()).expect_err(answer);
                assert!(
                    err.starts_with(&format!("it answered {answer}, "))
                        && err.contains(kind)
                        && err.ends_with("which clients on the internet cannot reach"),
                    "{provider} {answer}: {err}"
                );
            }
        }
    }

    #[test]
    fn anything_but_one_ipv4_address_is_refused_and_quoted() {
        for provider in PROVIDERS {
            for (answer, quoted) in [
                (&b"2001:db8::1"[..], r#""2001:db8::1""#),
                (b"fd00::1", r#""fd00::1""#),
                (b"::ffff:203.0.113.7", r#""::ffff:203.0.113.7""#),
                (b"203.0.113.7:51820", r#""203.0.113.7:51820""#),
                (b"203.0.113", r#""203.0.113""#),
                (b"203.0.113.7.1", r#""203.0.113.7.1""#),
                (b"203.0.113.256", r#""203.0.113.256""#),
                (b"0203.0.113.7", r#""0203.0.113.7""#),
                (b" 203.0.113.7", r#"" 203.0.113.7""#),
                (b"203.0.113.7 ", r#""203.0.113.7 ""#),
                (b"203.0.113.7\r\n", r#""203.0.113.7\r\n""#),
                (b"203.0.113.7\n\n", r#""203.0.113.7\n\n""#),
                (b"203.0.113.7\n10.0.0.1", r#""203.0.113.7\n10.0.0.1""#),
                (b"<html>Blocked</html>", r#""<html>Blocked</html>""#),
                (b"\x1b[2J\x07", r#""\u{1b}[2J\u{7}""#),
                (b"\xff\xfe1.2.3.4", "\"\u{fffd}\u{fffd}1.2.3.4\""),
            ] {
                let err = parse_public_ipv4(provider, 200, answer).expect_err(quoted);
                assert_eq!(
                    err,
                    format!("it answered {quoted}, which is not an IPv4 address"),
                    "{provider}"
                );
            }
            let long =
                parse_public_ipv4(provider, 200, "x".repeat(10_000).as_bytes()).expect_err("long");
            assert!(long.len() < 200 && long.contains("…"), "{long}");
        }
    }

    #[test]
    fn no_address_or_an_error_status_says_so() {
        for provider in PROVIDERS {
            for (status, body) in [(200, &b""[..]), (200, b"\n"), (404, b"Not Found")] {
                let err = parse_public_ipv4(provider, status, body).expect_err("none");
                assert!(err.contains("no public IPv4 address"), "{provider}: {err}");
            }
            let err = parse_public_ipv4(provider, 500, b"203.0.113.7").expect_err("500");
            assert_eq!(err, "it answered HTTP 500");
        }
        let azure = parse_public_ipv4(Provider::Azure, 200, b"").expect_err("none");
        assert!(azure.contains("Standard-SKU"), "{azure}");
        let aws = parse_public_ipv4(Provider::Aws, 404, b"").expect_err("none");
        assert_eq!(aws, "this instance has no public IPv4 address (HTTP 404)");
    }

    #[test]
    fn detection_lines() {
        let none = detection(&dmi("QEMU", "", ""), None, None, DEFAULT_ENDPOINT);
        assert_eq!(none.status, Level::Ok);
        assert!(none.message.contains("\"QEMU\""), "{}", none.message);
        let found = detection(
            &Dmi::default(),
            Some(Provider::Aws),
            Some(&Ok(aws())),
            DEFAULT_ENDPOINT,
        );
        assert_eq!(found.status, Level::Ok);
        assert!(
            found.message.contains("i-0123456789abcdef0 in eu-west-1"),
            "{}",
            found.message
        );
        let silent = detection(
            &Dmi::default(),
            Some(Provider::Gcp),
            Some(&Err("no answer".into())),
            DEFAULT_ENDPOINT,
        );
        assert_eq!(silent.status, Level::Warn);
        assert!(
            silent.message.contains("did not answer"),
            "{}",
            silent.message
        );
        assert!(!silent.fix.is_empty());
    }
}
