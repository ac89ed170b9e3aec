//! The generated Lima template against `schema/lima-template.schema.json`
//! (Lima v2.0's `LimaYAML` keys plus the rules of its `validate.go`), with
//! the jsonschema crate; and the schema's teeth: wrong keys and each rule's
//! violation are rejected.

use pyrolima::limayaml::{Arch, VmType};
use pyrolima::template::{self, TemplateOptions};
use pyrolima::{HostOs, HostPlatform};
use serde_json::{json, Value};

fn validator() -> jsonschema::Validator {
    let text = include_str!("../schema/lima-template.schema.json");
    let schema: Value = serde_json::from_str(text).expect("schema is JSON");
    jsonschema::draft202012::new(&schema).expect("schema compiles")
}

fn errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

type Spoil = fn(&mut Value);

/// A change that spoils a valid template, with what it breaks.
type Spoiler = (&'static str, Box<dyn Fn(&mut Value)>);

fn host(os: HostOs, arch: Arch, macos: Option<u32>, chip: Option<u32>) -> HostPlatform {
    HostPlatform { os, arch, macos_major: macos, apple_chip: chip }
}

/// The template for a host, as the JSON value its YAML parses to.
fn rendered(opts: &TemplateOptions) -> Value {
    let yaml = template::render(&template::build(opts).expect("template builds")).expect("renders");
    serde_norway::from_str(&yaml).expect("YAML parses")
}

fn linux_template() -> Value {
    rendered(&TemplateOptions::new(
        host(HostOs::Linux, Arch::X86_64, None, None),
        "/home/u/.cache/tvm-lima/tvm/share".into(),
    ))
}

#[test]
fn every_host_variant_passes_the_schema() {
    let v = validator();
    let variants = [
        ("linux x86_64 (qemu)", host(HostOs::Linux, Arch::X86_64, None, None), None),
        ("macOS 15 on M3 (vz, nested)", host(HostOs::Macos, Arch::Aarch64, Some(15), Some(3)), None),
        ("macOS 14 on M3 (qemu)", host(HostOs::Macos, Arch::Aarch64, Some(14), Some(3)), None),
        ("macOS on Intel (qemu)", host(HostOs::Macos, Arch::X86_64, Some(15), None), None),
        ("macOS on Intel, vz forced", host(HostOs::Macos, Arch::X86_64, Some(15), None), Some(VmType::Vz)),
        ("Windows (wsl2)", host(HostOs::Windows, Arch::X86_64, None, None), None),
        ("Windows, qemu forced", host(HostOs::Windows, Arch::X86_64, None, None), Some(VmType::Qemu)),
    ];
    for (label, h, vm_type) in variants {
        let staging = if h.os == HostOs::Windows {
            r"C:\Users\u\.cache\tvm-lima\tvm\share"
        } else {
            "~/.cache/tvm-lima/tvm/share"
        };
        let mut opts = TemplateOptions::new(h, staging.into());
        opts.vm_type = vm_type;
        let doc = rendered(&opts);
        assert_eq!(errors(&v, &doc), Vec::<String>::new(), "{label}: {doc:#}");
    }
    let mut custom = TemplateOptions::new(host(HostOs::Linux, Arch::X86_64, None, None), "/srv/share".into());
    (custom.cpus, custom.memory, custom.disk, custom.port) = (16, "32GiB".into(), "200G".into(), 18080);
    custom.image = Some("/images/debian-12.qcow2".into());
    assert_eq!(errors(&v, &rendered(&custom)), Vec::<String>::new());
}

#[test]
fn the_template_says_what_the_issue_asks() {
    let doc = linux_template();
    assert_eq!(doc["vmType"], "qemu");
    assert!(doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["arch"] == "x86_64" && i["location"].as_str().unwrap().contains("debian-12-genericcloud-amd64")));
    // The API reaches the host's loopback only, and nothing else is forwarded.
    let fw = doc["portForwards"].as_array().unwrap();
    assert_eq!(
        fw[0],
        json!({"guestIP": "127.0.0.1", "guestPort": 8080, "hostIP": "127.0.0.1", "hostPort": 8080, "proto": "tcp"})
    );
    assert_eq!(fw[1]["ignore"], true);
    // One read-only mount: the staging directory, not the home directory.
    assert_eq!(
        doc["mounts"],
        json!([{"location": "/home/u/.cache/tvm-lima/tvm/share", "mountPoint": "/mnt/tvm-host", "writable": false}])
    );
    assert_eq!(doc["ssh"]["forwardAgent"], false);
    assert_eq!(doc["containerd"], json!({"system": false, "user": false}));
    assert!(doc["probes"][0]["script"].as_str().unwrap().contains("/readyz"));
    let script = doc["provision"][0]["script"].as_str().unwrap();
    for needed in [
        "tvm kernel build",
        "tvm image build --defaults",
        "tvm serve --listen 127.0.0.1:8080",
        "qemu-system-x86",
        "qemu-system-arm",
    ] {
        assert!(script.contains(needed), "provision script lacks {needed}");
    }
}

#[test]
fn a_wrong_key_fails_anywhere() {
    let v = validator();
    let cases: [(&str, Spoil); 5] = [
        ("top-level typo", |d| {
            d["portForward"] = json!([]);
        }),
        ("key of another tool", |d| {
            d["cpu"] = json!(4);
        }),
        ("mount typo", |d| {
            d["mounts"][0]["mountpoint"] = json!("/mnt/x");
        }),
        ("probe typo", |d| {
            d["probes"][0]["scripts"] = json!("#!/bin/sh\ntrue");
        }),
        ("image typo", |d| {
            d["images"][0]["url"] = json!("https://example.invalid/x.qcow2");
        }),
    ];
    for (label, spoil) in cases {
        let mut doc = linux_template();
        spoil(&mut doc);
        assert!(!v.is_valid(&doc), "{label} was accepted");
    }
}

#[test]
fn each_validate_go_rule_rejects_its_violation() {
    let v = validator();
    let cases: Vec<Spoiler> = vec![
        ("images set", Box::new(|d| d["images"] = json!([]))),
        ("images absent", Box::new(|d| drop(d.as_object_mut().unwrap().remove("images")))),
        ("image arch", Box::new(|d| d["images"][0]["arch"] = json!("mips"))),
        ("initrd needs kernel", Box::new(|d| d["images"][0]["initrd"] = json!({"location": "/i", "arch": "x86_64"}))),
        ("cpus set", Box::new(|d| d["cpus"] = json!(0))),
        ("memory size", Box::new(|d| d["memory"] = json!("8 gigabytes"))),
        ("disk size", Box::new(|d| d["disk"] = json!("-5GiB"))),
        ("os", Box::new(|d| d["os"] = json!("Windows"))),
        ("arch", Box::new(|d| d["arch"] = json!("i386"))),
        ("vmType", Box::new(|d| d["vmType"] = json!("virtualbox"))),
        ("mountType", Box::new(|d| d["mountType"] = json!("nfs"))),
        ("absolute mount location", Box::new(|d| d["mounts"][0]["location"] = json!("relative/dir"))),
        ("system path mount", Box::new(|d| d["mounts"][0]["location"] = json!("/etc"))),
        ("system path mountPoint", Box::new(|d| d["mounts"][0]["mountPoint"] = json!("/usr"))),
        ("no ~ in mountPoint", Box::new(|d| d["mounts"][0]["mountPoint"] = json!("~/x"))),
        ("provision mode", Box::new(|d| d["provision"][0]["mode"] = json!("always"))),
        ("provision script set", Box::new(|d| d["provision"][0]["script"] = json!(""))),
        ("data fields only for data", Box::new(|d| d["provision"][0]["path"] = json!("/etc/x"))),
        (
            "skipDefaultDependencyResolution only for dependency",
            Box::new(|d| d["provision"][0]["skipDefaultDependencyResolution"] = json!(true)),
        ),
        ("data needs path", Box::new(|d| d["provision"] = json!([{"mode": "data", "content": "x"}]))),
        ("probe script starts with #!", Box::new(|d| d["probes"][0]["script"] = json!("curl /readyz"))),
        ("probe mode", Box::new(|d| d["probes"][0]["mode"] = json!("liveness"))),
        ("port not 22", Box::new(|d| d["portForwards"][0]["hostPort"] = json!(22))),
        ("port range", Box::new(|d| d["portForwards"][0]["guestPort"] = json!(70000))),
        ("proto", Box::new(|d| d["portForwards"][0]["proto"] = json!("sctp"))),
        ("port xor socket", Box::new(|d| d["portForwards"][0]["guestSocket"] = json!("/run/x.sock"))),
        (
            "absolute guest socket",
            Box::new(|d| d["portForwards"][1] = json!({"guestSocket": "run/x.sock", "hostSocket": "/tmp/x.sock"})),
        ),
        ("guestIPMustBeZero", Box::new(|d| d["portForwards"][0]["guestIPMustBeZero"] = json!(true))),
        ("reverse needs sockets", Box::new(|d| d["portForwards"][0]["reverse"] = json!(true))),
        ("hostIP is an IP", Box::new(|d| d["portForwards"][0]["hostIP"] = json!("localhost"))),
        ("param name", Box::new(|d| d["param"] = json!({"1bad": "x"}))),
        (
            "dns vs hostResolver",
            Box::new(|d| {
                d["hostResolver"] = json!({"enabled": true});
                d["dns"] = json!(["1.1.1.1"]);
            }),
        ),
        ("network kind", Box::new(|d| d["networks"] = json!([{"macAddress": "52:55:55:00:00:01"}]))),
        ("cpuType arch", Box::new(|d| d["cpuType"] = json!({"sparc": "x"}))),
        ("ssh localPort", Box::new(|d| d["ssh"]["localPort"] = json!(22))),
        ("minimumLimaVersion semver", Box::new(|d| d["minimumLimaVersion"] = json!("two"))),
    ];
    let baseline = linux_template();
    assert!(v.is_valid(&baseline));
    let mut accepted = Vec::new();
    for (rule, spoil) in &cases {
        let mut doc = baseline.clone();
        spoil(&mut doc);
        if v.is_valid(&doc) {
            accepted.push(*rule);
        }
    }
    assert!(accepted.is_empty(), "violations accepted: {accepted:?}");
}

#[test]
fn lima_style_nulls_and_other_valid_keys_pass() {
    // Lima's own templates spell "use the default" as null, and use keys TVM never sets.
    let v = validator();
    let mut doc = linux_template();
    for key in ["vmType", "arch", "cpus", "memory", "disk", "mountType", "timezone", "plain"] {
        doc[key] = Value::Null;
    }
    doc["env"] = json!({"LANG": "C.UTF-8"});
    doc["param"] = json!({"TVM_PORT": "8080"});
    doc["networks"] = json!([{"lima": "shared"}, {"vzNAT": true}]);
    doc["user"] = json!({"name": "tvm", "uid": 1000, "home": "/home/tvm.linux"});
    doc["additionalDisks"] = json!(["data", {"name": "cache", "format": true, "fsType": "ext4"}]);
    doc["copyToHost"] = json!([{"guest": "/etc/hostname", "host": "~/hostname", "deleteOnStop": true}]);
    assert_eq!(errors(&v, &doc), Vec::<String>::new());
}
