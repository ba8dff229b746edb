//! Network namespaces for fault tests: a target runs inside its own namespace, reachable from
//! the test over a veth pair, and the namespace's firewall can swallow every packet (a
//! blackhole: no RST, no FIN, the connection just goes silent) and let them through again.
//!
//! Each [`NetNs`] gets a unique name and a unique /30 (10.201.x.y) from a lease, so tests may
//! run in parallel. Needs root, `ip` (iproute2) and `nft` (nftables); a missing tool fails the
//! test.

use std::process::Command;
use std::time::Duration;

use crate::ports::{lease_number, PortLease};
use crate::process::run_with_timeout;
use crate::tools::require_tool;

const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// A network namespace joined to the test's namespace by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    /// Address of the test's (root namespace) end.
    pub outside_addr: String,
    /// Address inside the namespace (where the target listens).
    pub inside_addr: String,
    _lease: PortLease,
}

fn run(args: &[&str]) -> crate::CommandOutput {
    let (tool, rest) = args.split_first().expect("a command");
    let path = require_tool(tool);
    run_with_timeout(Command::new(path).args(rest), TOOL_TIMEOUT)
}

#[track_caller]
fn run_ok(args: &[&str]) {
    let out = run(args);
    assert!(out.success(), "`{}` failed: {out}", args.join(" "));
}

impl NetNs {
    /// Creates the namespace, the veth pair and the addresses, and brings the links up.
    pub fn create() -> NetNs {
        require_tool("nft");
        let lease = lease_number("netns", 1, 16000);
        let n = lease.get();
        let name = format!("vtest{n}");
        let host_if = format!("vh{n}");
        let ns_if = format!("vn{n}");
        // Subnet n: 10.201.(n / 64).(n % 64 * 4) /30.
        let base = u32::from(n) * 4;
        let (b3, b4) = (base / 256, base % 256);
        let outside_addr = format!("10.201.{b3}.{}", b4 + 1);
        let inside_addr = format!("10.201.{b3}.{}", b4 + 2);
        // A namespace left by a crashed earlier run with this name goes first.
        let _ = run(&["ip", "netns", "delete", &name]);
        let _ = run(&["ip", "link", "delete", &host_if]);
        run_ok(&["ip", "netns", "add", &name]);
        let ns = NetNs {
            name,
            host_if,
            outside_addr,
            inside_addr,
            _lease: lease,
        };
        run_ok(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &ns.name,
        ]);
        run_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.outside_addr),
            "dev",
            &ns.host_if,
        ]);
        run_ok(&["ip", "link", "set", &ns.host_if, "up"]);
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.inside_addr),
            "dev",
            &ns_if,
        ]);
        ns.exec_ok(&["ip", "link", "set", &ns_if, "up"]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new(require_tool("ip"));
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    #[track_caller]
    fn exec_ok(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run_ok(&full);
    }

    /// Drops every packet in and out of the namespace (established connections included).
    pub fn blackhole(&self) {
        require_tool("nft");
        let rules = "table inet viscsi_blackhole {\n\
             chain input { type filter hook input priority -300; policy drop; }\n\
             chain output { type filter hook output priority -300; policy drop; }\n\
             }\n";
        let path = std::env::temp_dir().join(format!("{}-blackhole.nft", self.name));
        std::fs::write(&path, rules).expect("write nft rules");
        self.exec_ok(&["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(path);
    }

    /// Lets packets through again.
    pub fn heal(&self) {
        self.exec_ok(&["nft", "delete", "table", "inet", "viscsi_blackhole"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "delete", &self.name]);
        let _ = run(&["ip", "link", "delete", &self.host_if]);
    }
}
