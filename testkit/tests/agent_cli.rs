//! The agent binary end to end, as root: `run` with a configuration of its
//! own (random database name, private runtime directory), `assign` and
//! `status --json` through the admin socket, and every error the agent
//! promises to name. Unprivileged runs skip with the reason.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use nodedb_governor_agent::{privilege, status::StatusReport};
use nodedb_governor_testkit::{
    harness::{Agent, Reaped, agent_binary, pins::RemovedPins, scratch::ScratchDir},
    privileged::skip_unless_privileged,
};

/// An agent with two engines of half the ceiling each, on `identity`
/// (`cgroup` or `tid`), ticking every 20 ms.
fn start_agent(identity: &str) -> Agent {
    Agent::start(
        "nodedb-agent-test",
        &format!(
            "identity = \"{identity}\"\ntick_ms = 20\nceiling = \"1GiB\"\n\
             [[engine]]\nname = \"vector\"\nbudget = \"50%\"\n\
             [[engine]]\nname = \"query\"\nbudget = \"50%\"\n"
        ),
    )
}

/// One raw request line on the admin socket; the reply line.
fn raw(agent: &Agent, request: &[u8]) -> String {
    let mut s = UnixStream::connect(&agent.admin).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("a reply");
    line
}

/// A governed stand-in process.
fn sleeper() -> Reaped {
    Reaped(Command::new("sleep").arg("120").spawn().expect("sleep"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assign(agent: &Agent, pid: u32, tid: u32, engine: &str) -> Output {
    agent.cli(&[
        "assign",
        "--pid",
        &pid.to_string(),
        "--tid",
        &tid.to_string(),
        "--engine",
        engine,
    ])
}

fn thread_cgroup(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).unwrap_or_default()
}

fn governs_and_reports(identity: &str) {
    let agent = start_agent(identity);
    let sleeper = sleeper();
    let pid = sleeper.id();
    let out = assign(&agent, pid, pid, "vector");
    assert!(out.status.success(), "assign failed: {}", stderr(&out));

    let status: StatusReport = agent.status();
    assert_eq!(status.schema, "nodedb-governor.status.v1");
    assert_eq!(
        status.engines.keys().collect::<Vec<_>>(),
        ["query", "vector"]
    );
    let p = status
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .expect("the process is governed");
    let total: u64 =
        p.engines.values().map(|e| e.resident_bytes).sum::<u64>() + p.unattributed.resident_bytes;
    let rss = p.vm_rss_bytes.expect("VmRSS");
    // From 6.2 the programs read each RSS counter's central value, which
    // lags the exact sum /proc shows by at most percpu_counter_batch pages
    // (max(32, 2 x CPUs)) per CPU, for each of anon, file and shmem. For a
    // process this small that bound, not the 2%, dominates.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let lag = 3 * cpus * 32.max(2 * cpus) * 4096;
    assert!(
        total.abs_diff(rss) <= rss / 50 + lag,
        "parts {total} vs VmRSS {rss}"
    );
    if identity == "cgroup" {
        let cg = thread_cgroup(pid, pid);
        assert!(cg.contains("/engine-vector"), "thread not moved: {cg}");
    }
}

#[test]
fn governs_a_process_with_cgroup_identity() {
    if skip_unless_privileged("governs_a_process_with_cgroup_identity") {
        return;
    }
    governs_and_reports("cgroup");
}

#[test]
fn governs_a_process_with_tid_identity() {
    if skip_unless_privileged("governs_a_process_with_tid_identity") {
        return;
    }
    governs_and_reports("tid");
}

#[test]
fn bad_requests_get_errors_naming_what_is_wrong() {
    if skip_unless_privileged("bad_requests_get_errors_naming_what_is_wrong") {
        return;
    }
    let agent = start_agent("cgroup");
    let sleeper = sleeper();
    let pid = sleeper.id();

    let out = assign(&agent, pid, pid, "gpu");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown engine `gpu` (configured engines: vector, query)"),
        "{}",
        stderr(&out)
    );

    let out = assign(&agent, 4_000_000, 4_000_000, "vector");
    assert!(
        stderr(&out).contains("no process with pid 4000000"),
        "{}",
        stderr(&out)
    );

    let out = assign(&agent, pid, std::process::id(), "vector");
    assert!(
        stderr(&out).contains(&format!(
            "thread {} does not belong to process {pid}",
            std::process::id()
        )),
        "{}",
        stderr(&out)
    );

    // Malformed, unknown and oversized requests over the raw socket: each
    // answered with an error, and the agent keeps serving.
    assert!(raw(&agent, b"{not json\n").contains("malformed request"));
    assert!(raw(&agent, b"{\"op\":\"reboot\"}\n").contains("reboot"));
    let mut big = vec![b'x'; 70 * 1024];
    big.push(b'\n');
    assert!(raw(&agent, &big).contains("exceeds"));
    assert_eq!(
        agent.status::<StatusReport>().schema,
        "nodedb-governor.status.v1"
    );
}

#[test]
fn a_cgroup_hierarchy_it_cannot_use_is_named() {
    if skip_unless_privileged("a_cgroup_hierarchy_it_cannot_use_is_named") {
        return;
    }
    let dir = ScratchDir::new("not-a-cgroup");
    // The agent has pinned its maps when it finds the hierarchy unusable.
    let _pins = RemovedPins(dir.name().to_owned());
    let config = dir.write(
        "governor.toml",
        &format!(
            "database = \"{}\"\nidentity = \"cgroup\"\ncgroup_root = \"{}\"\nrun_dir = \"{}\"\nceiling = 1048576\n[[engine]]\nname = \"a\"\nbudget = 1024\n",
            dir.name(),
            dir.path().display(),
            dir.path().display()
        ),
    );
    let out = Command::new(agent_binary())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("cannot use cgroup hierarchy") && e.contains("not a cgroup v2 directory"),
        "{e}"
    );
}

#[test]
fn a_run_dir_others_can_write_is_refused_by_name() {
    if skip_unless_privileged("a_run_dir_others_can_write_is_refused_by_name") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = ScratchDir::new("open-run-dir");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    // Made 1777 like /tmp: anyone could put a socket of their own there.
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let config = dir.write(
        "governor.toml",
        &format!(
            "database = \"{}\"\nrun_dir = \"{}\"\nceiling = 1048576\n[[engine]]\nname = \"a\"\nbudget = 1024\n",
            dir.name(),
            run.display()
        ),
    );
    let mut agent = Command::new(agent_binary())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while agent.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("the agent runs with its sockets in a directory others can write");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = agent.wait_with_output().unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains(&run.display().to_string()) && e.contains("mode 1777 lets others write it"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "nothing was put in it"
    );
}

#[test]
fn an_unprivileged_agent_names_the_missing_capabilities() {
    // This one needs root to drop to `nobody`; as a normal user the agent
    // would fail the same way, which the message check covers too.
    let mut cmd = if privilege::check_prerequisites().is_ok() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ]);
        c.arg(agent_binary());
        c
    } else {
        Command::new(agent_binary())
    };
    let out = cmd
        .args(["run"])
        .output()
        .expect("running the agent unprivileged");
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("needs root") && e.contains("CAP_BPF"), "{e}");
}

#[test]
fn check_config_accepts_the_default_and_names_bad_fields() {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nodedb-governor.toml");
    let out = Command::new(agent_binary())
        .arg("check-config")
        .arg(&default)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = ScratchDir::new("bad-config");
    let bad = dir.write(
        "bad.toml",
        "database = \"db\"\nceiling = 1048576\ntick_ms = 5\n[[engine]]\nname = \"a\"\nbudget = 1024\n",
    );
    let out = Command::new(agent_binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("tick_ms"), "{}", stderr(&out));
}

/// `check-config --json` prints the configuration as the agent resolves
/// it: percentages of the ceiling become bytes.
#[test]
fn check_config_json_resolves_budgets_against_the_ceiling() {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nodedb-governor.toml");
    let out = Command::new(agent_binary())
        .args(["check-config", "--json"])
        .arg(&default)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ceiling = v["ceiling_bytes"].as_u64().unwrap();
    assert_eq!(ceiling, 1 << 30);
    let engines = v["engines"].as_array().unwrap();
    let names: Vec<&str> = engines
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vector", "timeseries", "query"]);
    let vector = &engines[0];
    assert_eq!(vector["budget_bytes"].as_u64(), Some(ceiling * 40 / 100));
    assert_eq!(vector["floor_bytes"].as_u64(), Some(ceiling * 15 / 100));
    assert_eq!(engines[2]["essential"], false);
    assert_eq!(v["enforce"], true);
}

const NOBODY: u32 = 65534;
const ADMINS: u32 = 4242;

/// `cmd` run as `uid` (its gid the same number) with exactly `groups`.
fn as_user<'c>(cmd: &'c mut Command, uid: u32, groups: &[u32]) -> &'c mut Command {
    use std::os::unix::process::CommandExt;
    let groups = groups.to_vec();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The CLI run as `uid` with `groups` against `agent` (a copy of it in
/// the agent's world-readable directory: the build tree may be out of
/// that uid's reach).
fn cli_as(agent: &Agent, uid: u32, groups: &[u32], args: &[&str]) -> Output {
    let bin = agent.dir().copy_executable(&agent_binary());
    as_user(Command::new(bin).args(args), uid, groups)
        .arg("--socket")
        .arg(&agent.admin)
        .output()
        .expect("running the CLI")
}

fn admin_agent(extra: &str) -> Agent {
    Agent::start(
        "nodedb-agent-test",
        &format!(
            "tick_ms = 20\nceiling = \"1GiB\"\nadmin_group = {ADMINS}\n{extra}\n\
             [[engine]]\nname = \"vector\"\nbudget = \"50%\"\n\
             [[engine]]\nname = \"query\"\nbudget = \"50%\"\n"
        ),
    )
}

/// The admin socket is given to the admin group (0660) and serves root
/// and that group's members; anyone else is refused by their
/// credentials, even on a socket whose mode would let them in.
#[test]
fn the_admin_socket_serves_root_and_the_admin_group_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if skip_unless_privileged("admin socket credentials") {
        return;
    }
    let agent = admin_agent("");
    let meta = std::fs::metadata(&agent.admin).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (ADMINS, 0o660));

    let member = cli_as(&agent, NOBODY, &[ADMINS], &["status", "--json"]);
    assert!(member.status.success(), "{}", stderr(&member));

    // A mode an operator loosened by mistake: the credentials still rule.
    std::fs::set_permissions(&agent.admin, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        &["status", "--json"][..],
        &["assign", "--pid", "1", "--tid", "1", "--engine", "vector"],
    ] {
        let other = cli_as(&agent, NOBODY, &[], args);
        assert!(!other.status.success(), "{args:?} served to a non-member");
        assert!(
            stderr(&other).contains(&format!(
                "uid {NOBODY} may not use the admin socket: it takes root or a member of the admin group (gid {ADMINS})"
            )),
            "{}",
            stderr(&other)
        );
    }
    let root: StatusReport = agent.status();
    assert_eq!(root.schema, "nodedb-governor.status.v1");
}

/// `assign` is checked as a library's thread is: only processes of the
/// uids the control socket allows, root's only for root, and the admin
/// group's members may place what they are allowed to.
#[test]
fn assign_moves_only_processes_of_allowed_uids() {
    if skip_unless_privileged("admin socket assign checks") {
        return;
    }
    let agent = admin_agent(&format!("allowed_uids = [{NOBODY}]"));
    let spawn_as = |uid: u32| {
        let mut cmd = Command::new("sleep");
        cmd.arg("120");
        if uid != 0 {
            as_user(&mut cmd, uid, &[]);
        }
        Reaped(cmd.spawn().expect("sleep"))
    };
    let stranger = spawn_as(NOBODY - 1);
    let pid = stranger.id();
    let out = assign(&agent, pid, pid, "vector");
    assert!(
        !out.status.success(),
        "a process of a uid not allowed was moved"
    );
    assert!(
        stderr(&out).contains(&format!(
            "process {pid} runs as uid {}: root may not assign it",
            NOBODY - 1
        )),
        "{}",
        stderr(&out)
    );
    assert!(!thread_cgroup(pid, pid).contains("engine-vector"));

    let roots = spawn_as(0);
    let rpid = roots.id().to_string();
    let args = [
        "assign", "--pid", &rpid, "--tid", &rpid, "--engine", "vector",
    ];
    let out = cli_as(&agent, NOBODY, &[ADMINS], &args);
    assert!(
        stderr(&out).contains(&format!(
            "runs as uid 0: uid {NOBODY} (admin group) may not assign it"
        )),
        "{}",
        stderr(&out)
    );

    let allowed = spawn_as(NOBODY);
    let apid = allowed.id().to_string();
    let args = [
        "assign", "--pid", &apid, "--tid", &apid, "--engine", "vector",
    ];
    let out = cli_as(&agent, NOBODY, &[ADMINS], &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: StatusReport = agent.status();
    assert!(
        status.processes.iter().any(|p| p.pid == allowed.id()),
        "the member's assign governs the process"
    );
}

/// A field of `/proc/<pid>/status` as a number (hexadecimal for the
/// capability sets).
fn proc_status_field(pid: u32, field: &str, radix: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(value.trim(), radix).unwrap()
}

/// Once started, the agent holds only what it still uses: CAP_BPF,
/// CAP_SYS_NICE, CAP_SYS_RESOURCE (as far as it was given them), and
/// CAP_DAC_OVERRIDE only when it delegates; nothing in the bounding,
/// inheritable or ambient sets that an exec could bring back, and no new
/// privileges. The kernel's view (/proc/<agent>/status) and the status's
/// agree.
#[test]
fn a_running_agent_keeps_only_the_capabilities_it_uses() {
    if skip_unless_privileged("capabilities dropped") {
        return;
    }
    const CAP_DAC_OVERRIDE: u64 = 1;
    const CAP_SYS_NICE: u64 = 23;
    const CAP_SYS_RESOURCE: u64 = 24;
    const CAP_BPF: u64 = 39;
    let me = std::process::id();
    let given = proc_status_field(me, "CapPrm:", 16);
    let bounded = proc_status_field(me, "CapBnd:", 16);
    for (extra, delegating) in [
        ("", false),
        ("allowed_uids = [65534]\ndelegate_uid = 65534", true),
    ] {
        let agent = admin_agent(extra);
        let pid = agent.pid();
        let mut want = [CAP_SYS_NICE, CAP_SYS_RESOURCE, CAP_BPF]
            .iter()
            .fold(0u64, |m, b| m | 1 << b);
        if delegating {
            want |= 1 << CAP_DAC_OVERRIDE;
        }
        let names = |bits| nodedb_governor_agent::procfs::cap_names(bits);
        let eff = proc_status_field(pid, "CapEff:", 16);
        assert_eq!(
            names(eff),
            names(want & given),
            "effective, delegating: {delegating}"
        );
        assert_eq!(proc_status_field(pid, "CapPrm:", 16), eff, "permitted");
        assert_eq!(
            names(proc_status_field(pid, "CapBnd:", 16)),
            names(want & bounded),
            "bounding"
        );
        assert_eq!(proc_status_field(pid, "CapInh:", 16), 0, "inheritable");
        assert_eq!(proc_status_field(pid, "CapAmb:", 16), 0, "ambient");
        assert_eq!(proc_status_field(pid, "NoNewPrivs:", 10), 1, "no_new_privs");
        let status: StatusReport = agent.status();
        assert_eq!(status.capabilities.effective, names(eff));
        assert_eq!(status.capabilities.permitted, names(eff));
        assert!(
            !status
                .capabilities
                .effective
                .contains(&"cap_sys_admin".into())
        );
    }
}
