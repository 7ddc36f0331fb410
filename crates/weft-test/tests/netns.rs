//! The multi-host harness itself: hosts reach each other over the bridge, a partition cuts
//! them apart and healing joins them again, nothing touches the machine's own namespace, and
//! everything is gone after drop.

use std::process::Command;
use weft_test::netns::{KERNEL_REFUSES, Network};

/// `curl` from `from` to an HTTP server on `to`: whether it answered.
fn reaches(net: &Network, from: &str, to: &str) -> bool {
    let url = format!("http://{}:8000/", net.host(to).addr);
    net.run(from, &["curl", "-s", "-o", "/dev/null", "--max-time", "2", &url])
        .status
        .success()
}

fn namespaces() -> String {
    String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap()
}

#[tokio::test]
async fn hosts_talk_over_their_own_bridge_and_partitions_cut_and_heal() {
    let root_addrs = || String::from_utf8(Command::new("ip").args(["-4", "addr"]).output().unwrap().stdout).unwrap();
    let root_before = root_addrs();
    let net = match Network::new(&["a", "b", "c"]) {
        Ok(net) => net,
        Err(refused) => {
            assert_eq!(Network::skip_reason(&refused), KERNEL_REFUSES);
            return;
        }
    };
    let prefix = net.host("a").netns.trim_end_matches('a').to_string();
    let _server = net.spawn("a", "http-a", "python3", &["-m".into(), "http.server".into(), "8000".into()], &[]);
    weft_test::eventually(std::time::Duration::from_secs(10), "b reaches a", || async {
        reaches(&net, "b", "a").then_some(())
    })
    .await;
    assert!(reaches(&net, "c", "a"));
    assert_eq!(root_addrs(), root_before, "nothing was added to the machine's own namespace");
    assert!(!root_before.contains("198.18."), "the root namespace holds no test address");

    let cut = net.partition("a", &["c"]);
    assert!(!reaches(&net, "c", "a"), "c is cut off from a");
    assert!(reaches(&net, "b", "a"), "b still reaches a");
    cut.heal();
    assert!(reaches(&net, "c", "a"), "healed");

    drop(_server);
    drop(net);
    assert!(
        !namespaces().contains(&prefix),
        "every namespace is removed on drop:\n{}",
        namespaces()
    );
}
