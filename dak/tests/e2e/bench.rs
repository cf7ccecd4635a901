//! `dak bench` against an in-process stack: what it reports must add up.

use std::time::Duration;

use clap::Parser;
use dak_bench::{BenchArgs, Scenario};

use crate::support::{Options, Stack, SECRET};

#[derive(Parser)]
struct BenchCli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn args(stack: &Stack, scenario: Scenario, devices: usize, duration: Duration) -> BenchArgs {
    let mut args = BenchCli::try_parse_from(["bench", "--secret", SECRET])
        .expect("bench arguments parse")
        .bench;
    args.url = format!("http://{}", stack.public);
    // The plots go next to the stack's data, not into the source tree.
    args.plot_dir = stack.data_dir().join("plots");
    args.scenario = scenario;
    args.devices = devices;
    args.duration = duration;
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_accounts_for_every_message_it_sends() {
    let stack = Stack::start(Options {
        extra: vec!["--rate-limit".into(), "0".into()],
        ..Options::default()
    })
    .await;

    // The stack runs in this process: its CPU time is this process's.
    let mut direct_args = args(&stack, Scenario::Direct, 10, Duration::from_secs(3));
    direct_args.cpu_pids = vec![std::process::id()];
    let direct = dak_bench::run(direct_args)
        .await
        .expect("direct bench runs");
    eprintln!("{}", direct.summary());
    assert!(direct.sent > 0, "{}", direct.json());
    assert_eq!(direct.accepted, direct.sent, "{}", direct.json());
    assert_eq!(direct.delivered, direct.sent, "{}", direct.json());
    assert_eq!(direct.lost, 0, "{}", direct.json());
    assert_eq!(direct.duplicates, 0, "{}", direct.json());
    assert_eq!(direct.out_of_order, 0, "{}", direct.json());
    assert!(direct.p50_ms > 0.0 && direct.p50_ms <= direct.p99_ms);
    assert!(direct.p99_ms <= direct.p999_ms && direct.p999_ms <= direct.max_ms);
    assert_eq!(direct.connections, Some(10));
    assert!(!direct.failed());
    assert_eq!(direct.plots.len(), 2, "{}", direct.json());
    let cpu = direct.cpu_s.expect("the CPU time of --cpu-pid");
    assert!(cpu > 0.0, "{}", direct.json());
    let per_1k = direct.cpu_s_per_1k.expect("CPU per 1,000 messages");
    assert!((per_1k - cpu / direct.delivered as f64 * 1000.0).abs() < 1e-9);
    assert!(direct.generator_cpu_s.expect("the generator's CPU time") > 0.0);
    let svg = |path: &str| std::fs::read_to_string(path).expect("the plot was written");
    let (over_time, histogram) = (svg(&direct.plots[0]), svg(&direct.plots[1]));
    assert_eq!(over_time.matches("<polyline").count(), 3, "{over_time}");
    assert!(histogram.contains(r#"class="bar""#), "{histogram}");

    let offline = dak_bench::run(args(&stack, Scenario::Offline, 4, Duration::from_secs(2)))
        .await
        .expect("offline bench runs");
    eprintln!("{}", offline.summary());
    assert!(offline.sent > 0, "{}", offline.json());
    assert_eq!(offline.accepted, offline.sent, "{}", offline.json());
    assert_eq!(offline.delivered, offline.sent, "{}", offline.json());
    assert_eq!(offline.lost, 0, "{}", offline.json());
    assert_eq!(offline.duplicates, 0, "{}", offline.json());
    assert!(offline.sync_pages.unwrap() > 0);
    assert_eq!(offline.cpu_s, None, "no --cpu-pid given");
    assert!(offline.sync_page_p50_ms.unwrap() <= offline.sync_page_p99_ms.unwrap());

    // Three groups of four: each message reaches the three other members.
    let mut group = args(&stack, Scenario::Group, 12, Duration::from_secs(2));
    group.group_size = 4;
    group.rate = 30;
    let group = dak_bench::run(group).await.expect("group bench runs");
    eprintln!("{}", group.summary());
    assert!(group.sent > 0, "{}", group.json());
    assert_eq!(group.accepted, group.sent, "{}", group.json());
    assert_eq!(group.delivered, 3 * group.sent, "{}", group.json());
    assert_eq!(
        (group.lost, group.duplicates, group.out_of_order),
        (0, 0, 0),
        "{}",
        group.json()
    );
    assert!(group.errors.is_empty(), "{:?}", group.errors);

    stack.stop().await;
}
