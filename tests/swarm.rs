//! Apps on Docker Swarm (issue 12), on a single-node swarm of this
//! machine's engine: real pushes, real images, real swarm services, and
//! real HTTP load through the proxy, which routes to the tasks' host-mode
//! ports itself. Slow: they run when SLIPWAY_SLOW_TESTS=1 (CI sets it).
//!
//! The engine is left as it was found: a swarm this test initialised is
//! left again, and every service, container, network and image a test's
//! daemon made is removed by its label. `figure:` lines give the timings
//! for the closing note (nothing here asserts on time).

mod util;

use std::time::{Duration, Instant};

use util::*;

/// The engine in a swarm for a test's duration: initialised here (and
/// left at the end, with the bridge swarm made) unless it already was.
struct Swarm {
    initialised: bool,
    had_gwbridge: bool,
    // Held until after `drop` has left the swarm: the engine has one swarm,
    // and the tests of this file run on parallel threads under a plain
    // `cargo test`, where one test's `swarm leave` took the others' services.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_SWARM_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn docker(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("docker").args(args).output().expect("run docker");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

impl Swarm {
    fn join() -> Swarm {
        // A test that failed while holding the lock still left the swarm in its drop.
        let guard = ONE_SWARM_TEST.lock().unwrap_or_else(|e| e.into_inner());
        let (_, state) = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        if state.trim() == "active" {
            return Swarm { initialised: false, had_gwbridge: true, _one_at_a_time: guard };
        }
        let had_gwbridge = docker(&["network", "inspect", "docker_gwbridge"]).0;
        let (ok, out) = docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        assert!(ok, "docker swarm init: {out}");
        Swarm { initialised: true, had_gwbridge, _one_at_a_time: guard }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.initialised {
            let (ok, out) = docker(&["swarm", "leave", "--force"]);
            if !ok {
                eprintln!("docker swarm leave: {out}");
            }
            if !self.had_gwbridge {
                let _ = docker(&["network", "rm", "docker_gwbridge"]);
            }
        }
    }
}

/// A web app in a generated image: says its text and release; `/health`
/// fails when `healthy` is false.
fn swarm_app(text: &str) -> AppRepo {
    AppRepo::new(&[
        ("requirements.txt", "gunicorn==23.0.0\n"),
        ("Procfile", "web: gunicorn app:app --bind 0.0.0.0:$PORT --workers 2\n"),
        ("slipway.toml", "[docker]\nimage = \"python\"\n[healthcheck]\npath = \"/health\"\ntimeout = \"8s\"\n"),
        ("app.py", &app_code(text, true)),
    ])
}

fn app_code(text: &str, healthy: bool) -> String {
    let health = if healthy { "200 OK" } else { "500 Internal Server Error" };
    format!(
        "import os\n\
         def app(environ, start_response):\n\
         \x20   if environ['PATH_INFO'] == '/health':\n\
         \x20       start_response('{health}', [('Content-Length', '0')])\n\
         \x20       return [b'']\n\
         \x20   where = 'container' if os.path.exists('/.dockerenv') else 'host'\n\
         \x20   body = f'{text} {{where}} {{os.environ[\"SLIPWAY_RELEASE\"]}}\\n'.encode()\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n"
    )
}

/// The app's tasks as `ps --json` lists them.
fn tasks(server: &TestServer, app: &str) -> Vec<serde_json::Value> {
    server.json(&["ps", app, "--json"]).as_array().cloned().unwrap_or_default()
}

/// Wait until `ps` shows `n` running web tasks and nothing else.
fn wait_tasks(server: &TestServer, app: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let t = tasks(server, app);
        if t.len() == n && t.iter().all(|t| t["state"] == "running" && t["node"].is_string()) {
            return;
        }
        assert!(Instant::now() < deadline, "not {n} running tasks: {t:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The app's local containers (one per local process: their shims run
/// them), as opposed to its swarm tasks.
fn local_containers(server: &TestServer, app: &str) -> usize {
    use slipway::container::{server_id, Engine, LABEL_APP, LABEL_SERVER};
    let labels = [format!("{LABEL_SERVER}={}", server_id(&server.data())), format!("{LABEL_APP}={app}")];
    block_on(async move { Engine::connect().await.expect("engine").containers(&labels).await.expect("list") }).len()
}

/// The networks each of the daemon's task containers is on.
fn task_networks(server: &TestServer) -> Vec<Vec<String>> {
    let label = format!("{}={}", slipway::runtime::swarm::LABEL_SWARM_SERVER, slipway::container::server_id(&server.data()));
    let filters = std::collections::HashMap::from([("label".to_string(), vec![label])]);
    block_on(async move {
        let engine = slipway::container::Engine::connect().await.expect("engine");
        let opts = bollard::query_parameters::ListContainersOptionsBuilder::default().filters(&filters).build();
        engine.docker().list_containers(Some(opts)).await.expect("containers")
    })
    .into_iter()
    .map(|c| c.network_settings.and_then(|n| n.networks).map(|n| n.into_keys().collect()).unwrap_or_default())
    .collect()
}

/// The services this test's daemon has in the swarm.
fn services(server: &TestServer) -> usize {
    let id = slipway::container::server_id(&server.data());
    block_on(async move { slipway::runtime::swarm::services(&id, None).await.expect("services") }).len()
}

/// A test's start: the base image, the swarm, a daemon, and `app`
/// deployed (locally) from a fresh repo saying `text`; `None` when slow
/// tests are off. Dropped in reverse: the daemon and what it made go
/// before the swarm is left.
fn deployed(test: &str, app: &'static str, text: &str) -> Option<(Swarm, ContainerServer, AppRepo)> {
    if !slow_tests_enabled(test) {
        return None;
    }
    ensure_base();
    let swarm = Swarm::join();
    let server = ContainerServer::start(&[app]);
    let repo = swarm_app(text);
    repo.deploy(&server, app);
    Some((swarm, server, repo))
}

/// Stop the load, say its figure, and check that no request failed.
fn no_request_failed(load: Load, what: &str) {
    let (ok, failed, firsts) = load.finish();
    eprintln!("figure: {what}: {failed} failed of {} requests", ok + failed);
    assert!(ok > 20, "the load was too light: {ok} requests");
    assert_eq!(failed, 0, "{what}: {failed} of {} failed: {firsts:?}", ok + failed);
}

#[test]
fn an_app_moves_onto_the_swarm_and_back_under_load_without_a_failed_request() {
    let Some((_swarm, server, _repo)) = deployed("an_app_moves_onto_the_swarm_and_back_under_load_without_a_failed_request", "mover", "one") else {
        return;
    };
    assert!(server.get("mover", "/").1.starts_with("one container v1"));
    assert_eq!(server.json(&["apps", "info", "mover", "--json"])["scheduler"], "local");
    assert_eq!(local_containers(&server, "mover"), 1);

    let load = Load::start(&server, &["mover"], 4);
    let t = Instant::now();
    let out = server.ok(&["scheduler", "set", "mover", "swarm"]);
    let onto = t.elapsed().as_secs_f64();
    assert!(out.contains("runs on the swarm scheduler"), "{out}");
    assert_eq!(services(&server), 1, "one service: web");
    let listed = tasks(&server, "mover");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["release"], "v1");
    assert!(listed[0]["node"].as_str().is_some_and(|n| !n.is_empty()), "{listed:?}");
    // The task's own output is in the app's log (it listens on the task port).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = server.ok(&["logs", "mover", "--type", "web", "-n", "200"]);
        if logs.lines().any(|l| l.contains("web.1") && l.contains("Listening at: http://0.0.0.0:5000")) {
            break;
        }
        assert!(Instant::now() < deadline, "no task output in the logs:\n{logs}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The local container is gone; the task serves.
    assert_eq!(local_containers(&server, "mover"), 0, "local processes left");
    assert!(server.get("mover", "/").1.starts_with("one container v1"));
    assert_eq!(server.json(&["apps", "info", "mover", "--json"])["scheduler"], "swarm");
    // The task is on the app's own overlay network (and the engine's
    // gateway bridge, which drops traffic between containers), never on
    // the shared default bridge.
    let nets = task_networks(&server);
    assert_eq!(nets.len(), 1, "{nets:?}");
    assert!(nets[0].iter().any(|n| n.starts_with("slipway-mover-") && n.ends_with("-swarm")), "{nets:?}");
    assert!(!nets[0].iter().any(|n| n == "bridge"), "{nets:?}");
    let nodes = server.json(&["nodes", "--json"]);
    let node_tasks = nodes[0]["tasks"].as_array().expect("tasks on the node");
    assert!(node_tasks.iter().any(|t| t.as_str().is_some_and(|t| t.starts_with("mover web.1"))), "{nodes}");
    std::thread::sleep(Duration::from_secs(2));

    let t = Instant::now();
    let out = server.ok(&["scheduler", "set", "mover", "local"]);
    let back = t.elapsed().as_secs_f64();
    assert!(out.contains("runs on the local scheduler"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("figure: move onto the swarm: {onto:.1}s; back: {back:.1}s");
    no_request_failed(load, "moving onto the swarm and back under load");
    assert_eq!(services(&server), 0, "the services are removed");
    assert!(server.get("mover", "/").1.starts_with("one container v1"));
    assert_eq!(server.pids("mover").len(), 1, "one local process serves again");
    assert_eq!(local_containers(&server, "mover"), 1);
}

#[test]
fn scaled_tasks_roll_code_and_container_deploys_under_load_without_a_failed_request() {
    let Some((_swarm, server, repo)) = deployed("scaled_tasks_roll_code_and_container_deploys_under_load_without_a_failed_request", "roller", "v0")
    else {
        return;
    };
    server.ok(&["scheduler", "set", "roller", "swarm"]);
    server.ok(&["scale", "roller", "web=2"]);
    wait_tasks(&server, "roller", 2);

    let deploys: usize = std::env::var("SLIPWAY_SWARM_DEPLOYS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let load = Load::start(&server, &["roller"], 4);
    let mut times = Vec::new();
    for n in 1..=deploys {
        repo.write("app.py", &app_code(&format!("v{n}"), true));
        repo.commit(&format!("code v{n}"));
        let t = Instant::now();
        let out = repo.deploy(&server, "roller");
        times.push(t.elapsed().as_secs_f64());
        assert!(out.contains("code deploy: image "), "a code push built an image:\n{out}");
        let release = format!("v{}", n + 1);
        // Once the push returns, only the new release's tasks are routed.
        for _ in 0..4 {
            let body = server.get("roller", "/").1;
            assert_eq!(body, format!("v{n} container {release}\n"));
        }
        let listed = tasks(&server, "roller");
        assert_eq!(listed.iter().filter(|t| t["release"] == release.as_str()).count(), 2, "{listed:?}");
    }
    let list = times.iter().map(|t| format!("{t:.1}s")).collect::<Vec<_>>().join(", ");
    eprintln!("figure: {deploys} rolling code deploys of 2 tasks on 1 node: {list}");
    no_request_failed(load, &format!("{deploys} rolling code deploys under load"));

    // A dependency change: a new image, rolled the same way.
    let load = Load::start(&server, &["roller"], 4);
    repo.write("requirements.txt", "gunicorn==23.0.0\n# pinned\n");
    repo.commit("deps");
    let t = Instant::now();
    let out = repo.deploy(&server, "roller");
    let container = t.elapsed().as_secs_f64();
    assert!(out.contains("container deploy: requirements.txt changed"), "{out}");
    let release = format!("v{}", deploys + 2);
    assert_eq!(server.get("roller", "/").1, format!("v{deploys} container {release}\n"));
    eprintln!("figure: container deploy (dependency change) of 2 tasks on 1 node: {container:.1}s");
    no_request_failed(load, "a rolling container deploy under load");
}

#[test]
fn a_release_failing_its_health_check_is_rolled_back_with_the_old_tasks_serving() {
    let Some((_swarm, mut server, repo)) = deployed("a_release_failing_its_health_check_is_rolled_back_with_the_old_tasks_serving", "sick", "good") else {
        return;
    };
    server.ok(&["scheduler", "set", "sick", "swarm"]);

    let load = Load::start(&server, &["sick"], 4);
    repo.write("app.py", &app_code("bad", false));
    repo.commit("unhealthy");
    let t = Instant::now();
    let out = repo.deploy_rejected(&server, "sick");
    let rolled = t.elapsed().as_secs_f64();
    assert!(out.contains("the swarm rolled"), "{out}");
    assert!(out.contains("kept sick's previous tasks"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("figure: a push failing its health check on the swarm, rejected and rolled back in {rolled:.1}s");
    no_request_failed(load, "a rolled-back deploy under load");
    assert_eq!(server.get("sick", "/").1, "good container v1\n");
    // Only v1 tasks are wanted (tasks being stopped may still be listed).
    let wanted = |server: &TestServer| -> Vec<serde_json::Value> {
        tasks(server, "sick").into_iter().filter(|t| !t["state"].as_str().unwrap_or("").contains("stopping")).collect()
    };
    let listed = wanted(&server);
    assert!(!listed.is_empty() && listed.iter().all(|t| t["release"] == "v1"), "{listed:?}");
    let releases = server.json(&["releases", "sick", "--json"]);
    assert_eq!((&releases[0]["version"], &releases[0]["status"]), (&"v2".into(), &"failed".into()), "{releases}");

    // A daemon restart leaves the tasks running: the same task serves after.
    let before: Vec<serde_json::Value> = listed.iter().map(|t| t["task"].clone()).collect();
    assert!(server.stop(), "the daemon stopped");
    server.restart();
    server.wait_body("sick", "good container v1", Duration::from_secs(30));
    let after: Vec<serde_json::Value> = wanted(&server).iter().map(|t| t["task"].clone()).collect();
    assert_eq!(after, before, "the tasks were replaced by a daemon restart");
}
