//! `vpcgate doctor` against a real vpcgated in a namespace: each host
//! problem is reported with its fix and reported ok once fixed, and a
//! stopped daemon fails with the command that starts it. The cloud checks
//! run against the harness's fake metadata services (`FakeMetadata`) on the
//! namespace's loopback that play AWS (IMDSv2: no token, no answer), GCP
//! (Metadata-Flavor: Google) and Azure (Metadata: true), with fixture DMI
//! directories. Every run points doctor at a fixture DMI directory and a
//! loopback endpoint, so no test can reach a real metadata service.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpcgate_e2e::{
    raw_request, require_root, vpcgate_bin, wait_until, Cloud, FakeMetadata, Netns, Proc,
    VpcgatedConfig, WgDev, METADATA_VPC_MAC as VPC_MAC,
};

/// A gateway namespace: vpcgated, a VPC-side interface vpc0 (a veth whose
/// peer stays in the namespace) with
/// 198.18.64.10/20 and fd00:64:40::10/64, and a route to the "peered"
/// 198.19.101.0/24 (and fd00:65:101::/64) through the VPC router .1.
struct Gw {
    ns: Netns,
    dev: WgDev,
    empty_dmi: PathBuf,
}

impl Gw {
    fn start(tag: &str) -> Gw {
        let ns = Netns::new(tag).expect("namespace");
        let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
        cfg.state_dir = Some(ns.dir().join("state"));
        let dev = WgDev::vpcgated(&ns, tag, &cfg).expect("vpcgated starts");
        for args in [
            &[
                "link", "add", "vpc0", "address", VPC_MAC, "type", "veth", "peer", "name", "vpc0p",
            ][..],
            &["addr", "add", "198.18.64.10/20", "dev", "vpc0"],
            &[
                "-6",
                "addr",
                "add",
                "fd00:64:40::10/64",
                "dev",
                "vpc0",
                "nodad",
            ],
            &["link", "set", "vpc0", "up"],
            &["link", "set", "vpc0p", "up"],
            &[
                "route",
                "add",
                "198.19.101.0/24",
                "via",
                "198.18.64.1",
                "dev",
                "vpc0",
            ],
            &[
                "-6",
                "route",
                "add",
                "fd00:65:101::/64",
                "via",
                "fd00:64:40::1",
                "dev",
                "vpc0",
            ],
        ] {
            ns.ip(args).expect("ip");
        }
        let empty_dmi = ns.dir().join("dmi-none");
        std::fs::create_dir_all(&empty_dmi).expect("mkdir");
        Gw { ns, dev, empty_dmi }
    }

    /// The VPC's resolver, as a cloud VM has one: dnsmasq on the VPC
    /// address, with no records and no upstream, so it answers every
    /// question with REFUSED (doctor's probe only asks that it answer).
    /// The gateway is pointed at it; until then its namespace's
    /// resolv.conf lists no name server.
    fn start_resolver(&self) -> Proc {
        let argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            "--user=root",
            "--group=root",
            "--listen-address=198.18.64.10",
            "--bind-interfaces",
            "--port=53",
        ];
        let proc = self.ns.spawn("dnsmasq", &argv, &[]).expect("start dnsmasq");
        // Only stops a dnsmasq that never comes up from hanging the test.
        wait_until(Duration::from_secs(30), "dnsmasq to answer", || {
            let out =
                self.ns
                    .exec_raw(&["dig", "@198.18.64.10", ".", "NS", "+time=1", "+tries=1"])?;
            Ok(String::from_utf8_lossy(&out.stdout).contains("status:"))
        })
        .expect("dnsmasq answers");
        self.ok(&["set", "--dns-upstream", "198.18.64.10"]);
        proc
    }

    fn socket(&self) -> String {
        self.dev
            .control_socket()
            .expect("control socket")
            .to_string_lossy()
            .into_owned()
    }

    /// Runs the CLI, killed after 60 s (`timeout` then exits 124): a doctor
    /// that hangs on a silent endpoint fails instead of hanging the suite,
    /// and no run takes more than a few seconds.
    fn vpcgate(&self, args: &[&str]) -> Output {
        let bin = vpcgate_bin().expect("vpcgate binary");
        let bin = bin.to_string_lossy().into_owned();
        let socket = self.socket();
        let mut argv = vec!["timeout", "60", bin.as_str(), "--socket", socket.as_str()];
        argv.extend_from_slice(args);
        self.ns.exec_raw(&argv).expect("run vpcgate")
    }

    fn ok(&self, args: &[&str]) {
        let out = self.vpcgate(args);
        assert!(
            out.status.success(),
            "vpcgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn sysctl(&self, key: &str, value: &str) {
        self.ns
            .exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .expect("sysctl");
    }

    /// `vpcgate doctor --json` with the given DMI directory and metadata
    /// endpoint; returns whether it exited 0 and the checks.
    fn doctor(&self, dmi: &Path, endpoint: &str) -> (bool, Vec<Value>) {
        let dmi = dmi.to_string_lossy().into_owned();
        let out = self.vpcgate(&[
            "doctor",
            "--json",
            "--dmi-dir",
            &dmi,
            "--metadata-endpoint",
            endpoint,
        ]);
        let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor printed no JSON list ({e}, {}): stdout {:?} stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let failed = checks.iter().any(|c| c["status"] == "fail");
        assert_eq!(
            out.status.success(),
            !failed,
            "exit status must be non-zero exactly when a check fails: {checks:#?}"
        );
        if failed {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("failing check"), "{err}");
        }
        (out.status.success(), checks)
    }

    /// Doctor on a machine that is no cloud VM.
    fn doctor_here(&self) -> (bool, Vec<Value>) {
        // Nothing listens on port 1; with no cloud in DMI it is never used.
        self.doctor(&self.empty_dmi, "http://127.0.0.1:1")
    }
}

fn find<'a>(checks: &'a [Value], id: &str, subject: Option<&str>) -> &'a Value {
    checks
        .iter()
        .find(|c| {
            c["id"] == id
                && match subject {
                    None => true,
                    Some(s) => c["subject"] == s,
                }
        })
        .unwrap_or_else(|| panic!("no check {id} {subject:?} in {checks:#?}"))
}

fn status<'a>(checks: &'a [Value], id: &str, subject: Option<&str>) -> &'a str {
    find(checks, id, subject)["status"].as_str().unwrap_or("?")
}

fn fixes(check: &Value) -> Vec<String> {
    check["fix"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has_fix(check: &Value, text: &str) -> bool {
    fixes(check).iter().any(|f| f.contains(text))
}

#[test]
fn host_problems_are_reported_with_fixes_and_clear_when_fixed() {
    require_root();
    let gw = Gw::start("dh");
    gw.ok(&[
        "advertise-routes",
        "198.18.64.0/20,198.19.101.0/24,198.19.200.0/24,fd00:65:101::/64",
    ]);
    gw.sysctl("net.ipv4.ip_forward", "0");
    gw.sysctl("net.ipv6.conf.all.forwarding", "0");
    gw.sysctl("net.ipv4.conf.all.rp_filter", "0");
    gw.sysctl("net.ipv4.conf.vpc0.rp_filter", "1");

    let (ok, checks) = gw.doctor_here();
    assert!(!ok);
    assert_eq!(status(&checks, "daemon", None), "ok");
    let v4 = find(&checks, "ipv4_forwarding", None);
    assert_eq!(v4["status"], "fail", "{v4}");
    assert_eq!(fixes(v4)[0], "sysctl -w net.ipv4.ip_forward=1");
    let v6 = find(&checks, "ipv6_forwarding", None);
    assert_eq!(v6["status"], "fail", "{v6}");
    assert_eq!(fixes(v6)[0], "sysctl -w net.ipv6.conf.all.forwarding=1");

    assert_eq!(status(&checks, "route", Some("198.18.64.0/20")), "ok");
    let peered = find(&checks, "route", Some("198.19.101.0/24"));
    assert_eq!(peered["status"], "ok");
    assert!(
        peered["message"]
            .as_str()
            .is_some_and(|m| m.contains("goes via 198.18.64.1 on vpc0")),
        "{peered}"
    );
    assert_eq!(status(&checks, "route", Some("fd00:65:101::/64")), "ok");
    let missing = find(&checks, "route", Some("198.19.200.0/24"));
    assert_eq!(missing["status"], "fail", "{missing}");
    assert!(
        has_fix(
            missing,
            "ip route add 198.19.200.0/24 via 198.18.64.1 dev vpc0"
        ),
        "{missing}"
    );
    assert!(
        has_fix(
            missing,
            "vpcgate advertise-routes 198.18.64.0/20,198.19.101.0/24,fd00:65:101::/64"
        ),
        "{missing}"
    );

    let rp = find(&checks, "rp_filter", Some("vpc0"));
    assert_eq!(rp["status"], "warn", "{rp}");
    assert_eq!(fixes(rp)[0], "sysctl -w net.ipv4.conf.vpc0.rp_filter=2");
    let port = find(&checks, "listen_port", None);
    assert_eq!(port["status"], "ok", "{port}");
    assert!(port["message"]
        .as_str()
        .is_some_and(|m| m.contains("51820")));
    assert_eq!(status(&checks, "nftables", None), "ok");
    assert_eq!(status(&checks, "tun_device", None), "ok");
    assert_eq!(status(&checks, "cloud", None), "ok");
    assert!(checks.iter().all(|c| c["id"] != "cloud_forwarding"));
    // The namespace's resolv.conf has no name server, so the forwarder
    // has nowhere to send clients' questions.
    let dns = find(&checks, "dns", None);
    assert_eq!(dns["status"], "fail", "{dns}");
    assert!(has_fix(dns, "vpcgate set --dns-upstream IP"), "{dns}");

    // The effective value is the larger of all and the interface.
    gw.sysctl("net.ipv4.conf.all.rp_filter", "1");
    gw.sysctl("net.ipv4.conf.vpc0.rp_filter", "0");
    let (_, checks) = gw.doctor_here();
    assert_eq!(status(&checks, "rp_filter", Some("vpc0")), "warn");

    // Apply every fix doctor printed.
    let _resolver = gw.start_resolver();
    gw.sysctl("net.ipv4.ip_forward", "1");
    gw.sysctl("net.ipv6.conf.all.forwarding", "1");
    gw.sysctl("net.ipv4.conf.vpc0.rp_filter", "2");
    gw.ns
        .ip(&[
            "route",
            "add",
            "198.19.200.0/24",
            "via",
            "198.18.64.1",
            "dev",
            "vpc0",
        ])
        .expect("route");
    // An internet side, whose NIC the MTU is compared with.
    for args in [
        &[
            "link", "add", "inet0", "mtu", "1500", "type", "veth", "peer", "name", "inet0p",
        ][..],
        &["addr", "add", "198.18.2.10/24", "dev", "inet0"],
        &["link", "set", "inet0", "up"],
        &["link", "set", "inet0p", "up"],
        &[
            "route",
            "add",
            "default",
            "via",
            "198.18.2.1",
            "dev",
            "inet0",
        ],
    ] {
        gw.ns.ip(args).expect("ip");
    }
    let (ok, checks) = gw.doctor_here();
    let not_ok: Vec<&Value> = checks.iter().filter(|c| c["status"] != "ok").collect();
    assert!(ok && not_ok.is_empty(), "{not_ok:#?}");
    let mtu = find(&checks, "mtu", None);
    assert!(
        mtu["message"]
            .as_str()
            .is_some_and(|m| m.contains("1420") && m.contains("inet0")),
        "{mtu}"
    );

    // A NIC like GCP's: 1420 + 60 does not fit 1460.
    gw.ns
        .ip(&["link", "set", "inet0", "mtu", "1460"])
        .expect("mtu");
    let (ok, checks) = gw.doctor_here();
    assert!(!ok);
    let mtu = find(&checks, "mtu", None);
    assert_eq!(mtu["status"], "fail", "{mtu}");
    assert!(has_fix(mtu, "vpcgate set --mtu 1380"), "{mtu}");
    gw.ok(&["set", "--mtu", "1380"]);
    let (ok, checks) = gw.doctor_here();
    assert!(ok, "{checks:#?}");
    assert_eq!(status(&checks, "mtu", None), "ok", "the printed fix works");
    gw.ns
        .ip(&["link", "set", "inet0", "mtu", "1500"])
        .expect("mtu");

    // The text form: one line per check, fixes indented below.
    let dmi = gw.empty_dmi.to_string_lossy().into_owned();
    let text = gw.vpcgate(&[
        "doctor",
        "--dmi-dir",
        &dmi,
        "--metadata-endpoint",
        "http://127.0.0.1:1",
    ]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ok    daemon: vpcgated answers"), "{text}");
    assert!(
        text.trim_end().ends_with("0 failed, 0 warnings, 16 ok"),
        "{text}"
    );

    // With the daemon stopped the host checks still run.
    let mut gw = gw;
    let exit = gw
        .dev
        .process()
        .terminate(Duration::from_secs(10))
        .expect("vpcgated stops");
    assert!(exit.success());
    let (ok, checks) = gw.doctor_here();
    assert!(!ok);
    let daemon = find(&checks, "daemon", None);
    assert_eq!(daemon["status"], "fail", "{daemon}");
    assert_eq!(fixes(daemon)[0], "systemctl start vpcgated");
    let ids: Vec<&str> = checks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(
        ids,
        [
            "daemon",
            "ipv4_forwarding",
            "nftables",
            "tun_device",
            "cloud"
        ]
    );
    assert_eq!(status(&checks, "ipv4_forwarding", None), "ok");
}

#[test]
fn cloud_forwarding_switch_per_provider() {
    require_root();
    let gw = Gw::start("dc");
    gw.ok(&["advertise-routes", "198.18.64.0/20"]);
    gw.sysctl("net.ipv4.ip_forward", "1");
    gw.sysctl("net.ipv4.conf.all.rp_filter", "0");
    gw.sysctl("net.ipv4.conf.vpc0.rp_filter", "2");
    let _resolver = gw.start_resolver();
    let clouds = [Cloud::Aws, Cloud::Gcp, Cloud::Azure];

    // The fakes enforce what the real services do.
    let aws = FakeMetadata::start(&gw.ns, Some(Cloud::Aws));
    let bare = raw_request(
        &gw.ns,
        aws.port,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(bare.starts_with("HTTP/1.1 401"), "{bare}");
    drop(aws);
    let gcp = FakeMetadata::start(&gw.ns, Some(Cloud::Gcp));
    let bare = raw_request(
        &gw.ns,
        gcp.port,
        "GET /computeMetadata/v1/instance/name HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(bare.starts_with("HTTP/1.1 403"), "{bare}");
    drop(gcp);
    let azure = FakeMetadata::start(&gw.ns, Some(Cloud::Azure));
    let bare = raw_request(
        &gw.ns,
        azure.port,
        "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(bare.starts_with("HTTP/1.1 400"), "{bare}");
    drop(azure);

    // SNAT on (the default): the switch does not matter, whatever it is.
    for cloud in clouds {
        let fake = FakeMetadata::start(&gw.ns, Some(cloud));
        let dmi = cloud.dmi(gw.ns.dir());
        let (ok, checks) = gw.doctor(&dmi, &fake.url());
        assert!(ok, "{cloud:?}: {checks:#?}");
        let detected = find(&checks, "cloud", Some(cloud.subject()));
        assert_eq!(detected["status"], "ok", "{cloud:?}: {detected}");
        let switch = find(&checks, "cloud_forwarding", Some(cloud.subject()));
        assert_eq!(switch["status"], "ok", "{cloud:?}: {switch}");
        assert!(fixes(switch).is_empty());
        let seen = fake.seen();
        assert!(
            !seen.is_empty(),
            "{cloud:?}: doctor never asked the metadata service"
        );
        assert!(
            seen.iter().all(|s| s.authorized),
            "{cloud:?}: a request lacked the provider's token or header: {seen:?}"
        );
        if cloud == Cloud::Aws {
            assert_eq!(
                (seen[0].method.as_str(), seen[0].path.as_str()),
                ("PUT", "/latest/api/token"),
                "IMDSv2 starts with the token: {seen:?}"
            );
        }
    }

    // SNAT off: the switch matters and cannot be read from inside the VM,
    // so doctor warns and names the exact commands for this instance.
    gw.ok(&["set", "--snat", "off"]);
    let expected: [(Cloud, &str, &[&str]); 3] = [
        (
            Cloud::Aws,
            "instance i-0123456789abcdef0 in eu-west-1",
            &[
                "check: aws ec2 describe-instance-attribute --region eu-west-1 --instance-id i-0123456789abcdef0 --attribute sourceDestCheck",
                "fix: aws ec2 modify-instance-attribute --region eu-west-1 --instance-id i-0123456789abcdef0 --no-source-dest-check",
                "console: EC2 → Instances → i-0123456789abcdef0 → Actions → Networking → Change source/destination check",
            ],
        ),
        (
            Cloud::Gcp,
            "instance gw-1 in us-central1-a, project proj-x",
            &[
                "check: gcloud compute instances describe gw-1 --zone us-central1-a --project proj-x --format='value(canIpForward)'",
                "gcloud compute instances update-from-file gw-1 --zone us-central1-a --project proj-x",
            ],
        ),
        (
            Cloud::Azure,
            "VM gw-vm in resource group net-rg",
            &[
                "fix: az network nic update --ip-forwarding true --ids $(az network nic list --subscription 8d10da13-8125-4ba9-a717-bf7490507b3d --resource-group net-rg --query \"[?macAddress=='02-00-00-00-64-0A'].id\" --output tsv)",
                "console: Virtual machines → gw-vm → Networking",
            ],
        ),
    ];
    for (cloud, identity, commands) in expected {
        let fake = FakeMetadata::start(&gw.ns, Some(cloud));
        let dmi = cloud.dmi(gw.ns.dir());
        let (ok, checks) = gw.doctor(&dmi, &fake.url());
        assert!(ok, "a warning alone does not fail doctor: {checks:#?}");
        let detected = find(&checks, "cloud", Some(cloud.subject()));
        assert!(
            detected["message"]
                .as_str()
                .is_some_and(|m| m.contains(identity)),
            "{cloud:?}: {detected}"
        );
        let switch = find(&checks, "cloud_forwarding", Some(cloud.subject()));
        assert_eq!(switch["status"], "warn", "{cloud:?}: {switch}");
        assert!(
            switch["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot be checked from inside the VM")),
            "{switch}"
        );
        for command in commands {
            assert!(
                has_fix(switch, command),
                "{cloud:?}: want {command:?} in {switch:#}"
            );
        }
        assert!(has_fix(switch, "100.64.0.0/24"), "{switch:#}");
        assert!(has_fix(switch, "vpcgate set --snat on"), "{switch:#}");
        assert!(fake.seen().iter().all(|s| s.authorized));
    }

    // A metadata service that refuses connections, and one that never
    // answers: doctor says so, keeps the placeholders, and does not hang.
    let dmi = Cloud::Aws.dmi(gw.ns.dir());
    let hang = FakeMetadata::start(&gw.ns, None);
    for endpoint in ["http://127.0.0.1:1".to_string(), hang.url()] {
        let started = Instant::now();
        let (ok, checks) = gw.doctor(&dmi, &endpoint);
        // Doctor gives the metadata service 5 s in all (2 s a request); its
        // other checks take a fraction of a second here, so 10 s holds on a
        // much slower machine. Without a limit it would run into `timeout`.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{endpoint}: {:?}",
            started.elapsed()
        );
        assert!(ok, "{checks:#?}");
        let detected = find(&checks, "cloud", Some("aws"));
        assert_eq!(detected["status"], "warn", "{detected}");
        let switch = find(&checks, "cloud_forwarding", Some("aws"));
        assert!(
            has_fix(switch, "--instance-id <instance id> --no-source-dest-check"),
            "{switch:#}"
        );
    }
}

/// A VPC that routes part of 100.64.0.0/10 itself (EKS adds 100.64.0.0/16
/// for pods): `advertise-routes` warns and doctor fails, both naming the
/// route and suggesting a free tunnel address; without that route doctor
/// is content.
#[test]
fn tunnel_network_overlapping_a_vpc_route() {
    require_root();
    let gw = Gw::start("do");
    gw.ok(&["advertise-routes", "198.18.64.0/20"]);
    let (_, checks) = gw.doctor_here();
    assert_eq!(status(&checks, "tunnel-network", None), "ok");

    gw.ns
        .ip(&[
            "route",
            "add",
            "100.64.0.0/16",
            "via",
            "198.18.64.1",
            "dev",
            "vpc0",
        ])
        .expect("a VPC route over the tunnel network");
    let out = gw.vpcgate(&["advertise-routes", "198.18.64.0/20"]);
    assert!(out.status.success(), "{out:?}");
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("100.64.0.0/16 dev vpc0")
            && warned.contains("vpcgate set --address 100.65.0.1/24"),
        "advertise-routes did not warn: {warned}"
    );
    let (passed, checks) = gw.doctor_here();
    assert!(!passed, "doctor must fail");
    let check = find(&checks, "tunnel-network", None);
    assert_eq!(check["status"], "fail");
    assert!(
        check["message"]
            .as_str()
            .is_some_and(|m| m.contains("100.64.0.0/16 via 198.18.64.1 dev vpc0")),
        "{check}"
    );
    assert!(
        has_fix(check, "vpcgate set --address 100.65.0.1/24"),
        "{check}"
    );
}
