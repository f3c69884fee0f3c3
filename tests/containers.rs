//! Apps in containers (issue 11): a real Docker engine, images built here
//! from the base `slipway images import-base` imports, real pushes, real
//! HTTP through the proxy. Slow (image builds): they run when
//! SLIPWAY_SLOW_TESTS=1 (CI sets it), and say so when skipped. Every
//! container a test's daemon made is removed by its label at the end.

mod util;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bollard::models::ContainerSummary;
use bollard::query_parameters::ListContainersOptionsBuilder;
use slipway::container::{server_id, Engine, LABEL_APP, LABEL_SERVER, LABEL_TYPE};
use util::*;

/// The containers this test's daemon has in the engine.
fn containers_of(server: &ContainerServer) -> Vec<String> {
    let label = format!("{LABEL_SERVER}={}", server_id(&server.data()));
    block_on(async { Engine::connect().await.expect("engine").containers(&[label]).await.expect("list") })
}

/// The running web containers of `app` under this test's daemon.
fn web_containers(server: &ContainerServer, app: &str) -> Vec<ContainerSummary> {
    let labels = vec![format!("{LABEL_SERVER}={}", server_id(&server.data())), format!("{LABEL_APP}={app}"), format!("{LABEL_TYPE}=web")];
    let filters = HashMap::from([("label".to_string(), labels)]);
    block_on(async {
        let engine = Engine::connect().await.expect("engine");
        engine.docker().list_containers(Some(ListContainersOptionsBuilder::default().filters(&filters).build())).await.expect("list")
    })
}

/// The ids of the images this test's daemon has in the engine.
fn image_ids_of(server: &ContainerServer) -> BTreeSet<String> {
    let label = format!("{LABEL_SERVER}={}", server_id(&server.data()));
    block_on(async { Engine::connect().await.expect("engine").images(&label).await.expect("list") }).into_iter().map(|i| i.id).collect()
}

/// A WSGI app that says what it sees: whether it is in a container, its
/// uid, whether the root filesystem is writable, and its data dir.
fn probe_app(text: &str) -> String {
    format!(
        "import os\n\
         def app(environ, start_response):\n\
         \x20   try:\n\
         \x20       open('/written-by-app', 'w').close()\n\
         \x20       root = 'rw'\n\
         \x20   except OSError:\n\
         \x20       root = 'ro'\n\
         \x20   data = os.environ['SLIPWAY_DATA_DIR']\n\
         \x20   open(os.path.join(data, 'probe'), 'w').write('x')\n\
         \x20   caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n\
         \x20   where = 'container' if os.path.exists('/.dockerenv') else 'host'\n\
         \x20   body = f'{text} {{where}} uid={{os.getuid()}} root={{root}} caps={{caps}}\\n'.encode()\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n"
    )
}

const DOCKERFILE: &str = "FROM slipway/python:bookworm\n\
COPY .slipway/ca.crt /etc/build-ca.crt\n\
COPY requirements.txt /opt/requirements.txt\n\
RUN python3 -m venv /opt/venv && SSL_CERT_FILE=/etc/build-ca.crt PIP_CERT=/etc/build-ca.crt /opt/venv/bin/pip install --no-cache-dir -q -r /opt/requirements.txt\n\
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";

fn dockerfile_app(text: &str, reload: &str) -> AppRepo {
    AppRepo::new(&[
        ("Dockerfile", DOCKERFILE),
        ("requirements.txt", "gunicorn==23.0.0\n"),
        ("Procfile", "web: gunicorn app:app --bind 0.0.0.0:$PORT --workers 1\n"),
        ("slipway.toml", &format!("[processes.web]\nreload = \"{reload}\"\n")),
        ("app.py", &probe_app(text)),
    ])
}

#[test]
fn dockerfile_app_runs_isolated_and_code_pushes_reuse_the_image() {
    if !slow_tests_enabled("dockerfile_app_runs_isolated_and_code_pushes_reuse_the_image") {
        return;
    }
    ensure_base();
    let server = ContainerServer::start(&["boxed"]);
    let repo = dockerfile_app("one", "signal:HUP");
    let out = repo.deploy(&server, "boxed");
    assert!(out.contains("container deploy: no image of these inputs yet"), "{out}");
    let (status, body) = server.get("boxed", "/");
    assert_eq!(status, 200, "{body}");
    // In a container, as the app's own uid, read-only root, no capabilities.
    assert!(body.starts_with("one container uid=2"), "{body}");
    assert!(body.contains("root=ro"), "{body}");
    assert!(body.contains("caps=0000000000000000"), "{body}");
    // The data dir is writable and is the host's.
    assert!(server.data().join("apps/boxed/data/probe").is_file());
    assert_eq!(containers_of(&server).len(), 1, "one web container");
    let info = server.json(&["apps", "info", "boxed", "--json"]);
    assert!(info["images"].as_str().is_some_and(|s| s.starts_with("1 image, ") && s.contains(" MB")), "{info}");

    // Code only: the image is reused, the code switched under the running
    // container by HUP.
    repo.write("app.py", &probe_app("two"));
    repo.commit("code only");
    let out = repo.deploy(&server, "boxed");
    assert!(out.contains("code deploy: image "), "{out}");
    assert!(out.contains("reused (Dockerfile, requirements.txt, base image unchanged)"), "{out}");
    assert!(!out.contains("building"), "a code-only push built an image:\n{out}");
    server.wait_body("boxed", "two container", Duration::from_secs(20));

    // A dependency change: a container deploy, saying why.
    repo.write("requirements.txt", "gunicorn==23.0.0\n# pinned\n");
    repo.commit("deps");
    let (ok, out) = repo.push(&server.git_url("boxed"), "main");
    assert!(ok, "{out}\napp log:\n{}", server.ok(&["logs", "boxed", "-n", "60"]));
    assert!(out.contains("container deploy: requirements.txt changed"), "{out}");
    let (status, body) = server.get("boxed", "/");
    assert!(body.starts_with("two container"), "{status} {body}\n{out}");
    assert_eq!(containers_of(&server).len(), 1, "old containers are stopped and removed");

    // Rollback to v1 runs v1's tree in v1's image.
    let out = server.ok(&["rollback", "boxed", "v1"]);
    assert!(out.contains("code deploy: image "), "{out}");
    server.wait_body("boxed", "one container", Duration::from_secs(20));
}

#[test]
fn missing_base_image_is_refused_naming_it() {
    if !slow_tests_enabled("missing_base_image_is_refused_naming_it") {
        return;
    }
    let server = ContainerServer::start(&["nobase"]);
    let repo = AppRepo::new(&[
        ("Dockerfile", "FROM example.org/nowhere/python:3.99\n"),
        ("Procfile", "web: python3 -m http.server $PORT\n"),
    ]);
    let out = repo.deploy_rejected(&server, "nobase");
    assert!(out.contains("base image example.org/nowhere/python:3.99 is not on this server"), "{out}");
    assert!(out.contains("slipway images import-base"), "{out}");
    assert!(containers_of(&server).is_empty());
}

#[test]
fn failing_image_build_rejects_the_push_and_the_old_containers_keep_serving() {
    if !slow_tests_enabled("failing_image_build_rejects_the_push_and_the_old_containers_keep_serving") {
        return;
    }
    ensure_base();
    let server = ContainerServer::start(&["genpy", "genbad"]);
    // No Dockerfile: `[docker] image = "python"` generates one.
    let repo = AppRepo::new(&[
        ("requirements.txt", "gunicorn==23.0.0\n"),
        ("Procfile", "web: gunicorn app:app --bind 0.0.0.0:$PORT --workers 1\n"),
        (
            "slipway.toml",
            "[docker]\nimage = \"python\"\n\
             [test]\ncommand = \"test -f /.dockerenv && echo gate in $VIRTUAL_ENV\"\n\
             [release]\ncommand = \"touch $SLIPWAY_DATA_DIR/released && test ! -w /\"\n",
        ),
        ("app.py", &probe_app("generated")),
    ]);
    let out = repo.deploy(&server, "genpy");
    assert!(out.contains("container deploy"), "{out}");
    // The test gate and the release phase ran in the image, with the data dir mounted.
    assert!(out.contains("gate in /opt/venv"), "{out}");
    assert!(server.data().join("apps/genpy/data/released").is_file());
    assert!(server.get("genpy", "/").1.starts_with("generated container"));

    // A dependency that does not exist: the build fails, nothing changes.
    repo.write("requirements.txt", "gunicorn==23.0.0\nno-such-package-slipway-test==0.0.1\n");
    repo.commit("bad dep");
    let out = repo.deploy_rejected(&server, "genpy");
    assert!(out.contains("the image build failed"), "{out}");
    assert!(server.get("genpy", "/").1.starts_with("generated container"));
    // v2 stays on record as failed (history is whole); v1 is still live.
    let releases = server.json(&["releases", "genpy", "--json"]);
    assert_eq!((&releases[0]["version"], &releases[0]["status"]), (&"v2".into(), &"failed".into()), "{releases}");
    assert_eq!((&releases[1]["version"], &releases[1]["status"]), (&"v1".into(), &"live".into()), "{releases}");

    // A crash on boot inside the container is reported with its output.
    let bad = AppRepo::new(&[
        ("Procfile", "web: python3 -c 'import sys; print(\"boom in container\"); sys.exit(3)'\n"),
        ("slipway.toml", "[docker]\nimage = \"python\"\n"),
    ]);
    let out = bad.deploy_rejected(&server, "genbad");
    assert!(out.contains("crashed on boot"), "{out}");
    assert!(out.contains("boom in container"), "{out}");
}

#[test]
fn restarted_daemon_removes_exactly_its_own_leftover_containers() {
    if !slow_tests_enabled("restarted_daemon_removes_exactly_its_own_leftover_containers") {
        return;
    }
    ensure_base();
    let mut server = ContainerServer::start(&["crashy"]);
    let other = ContainerServer::start(&["keep"]);
    let repo = dockerfile_app("crash", "replace");
    repo.deploy(&server, "crashy");
    repo.deploy(&other, "keep");
    assert_eq!(containers_of(&server).len(), 1);

    // The daemon and its shims die at once; the containers stay.
    let shims = server.pids("crashy");
    server.kill9();
    for pid in shims {
        signal(pid, libc::SIGKILL);
    }
    assert_eq!(containers_of(&server).len(), 1, "the container outlives a killed shim");
    server.restart();
    let (status, body) = server.get("crashy", "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(containers_of(&server).len(), 1, "the leftover was removed, one new container serves");
    // The other daemon's container was not touched.
    assert_eq!(containers_of(&other).len(), 1);
    assert!(other.get("keep", "/").1.starts_with("crash container"));
}

#[test]
fn promoted_dockerfile_app_runs_stagings_image_and_its_release_phase_in_it() {
    if !slow_tests_enabled("promoted_dockerfile_app_runs_stagings_image_and_its_release_phase_in_it") {
        return;
    }
    ensure_base();
    let server = ContainerServer::start(&["stage", "prod"]);
    let repo = dockerfile_app("staged", "replace");
    // The release phase writes down where it ran.
    repo.write(
        "slipway.toml",
        "[processes.web]\nreload = \"replace\"\n\
         [release]\ncommand = \"if test -f /.dockerenv; then echo container; else echo host; fi > $SLIPWAY_DATA_DIR/released-in\"\n",
    );
    repo.commit("release phase");
    repo.deploy(&server, "stage");
    let stage_web = web_containers(&server, "stage");
    assert_eq!(stage_web.len(), 1);
    let stage_image = stage_web[0].image_id.clone().expect("image id");
    server.ok(&["apps", "create", "prod"]);
    let images_before = image_ids_of(&server);

    let out = server.ok(&["promote", "stage", "--to", "prod"]);
    assert!(out.contains("promote: image "), "{out}");
    assert!(!out.contains("building") && !out.contains("container deploy"), "a promotion built an image:\n{out}");
    // prod's own release phase ran, in the container, with prod's data dir.
    let released = std::fs::read_to_string(server.data().join("apps/prod/data/released-in")).expect("prod's release phase ran");
    assert_eq!(released.trim(), "container");
    let (status, body) = server.get("prod", "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("staged container"), "{body}");
    // prod runs staging's very image; nothing new is in the engine.
    let prod_images: Vec<_> = web_containers(&server, "prod").into_iter().map(|c| c.image_id.unwrap_or_default()).collect();
    assert_eq!(prod_images, vec![stage_image], "prod's containers run staging's image");
    assert_eq!(image_ids_of(&server), images_before, "no image was built by the promotion");
}

/// A WSGI app that connects, from inside its container, to the address in
/// its path (`/connect/IP/PORT`) and says whether it could.
const CONNECT_APP: &str = "import socket\n\
def app(environ, start_response):\n\
\x20   parts = environ['PATH_INFO'].strip('/').split('/')\n\
\x20   if parts[0] == 'connect':\n\
\x20       s = socket.socket()\n\
\x20       s.settimeout(3)\n\
\x20       try:\n\
\x20           s.connect((parts[1], int(parts[2])))\n\
\x20           body = 'connected'\n\
\x20       except OSError as e:\n\
\x20           body = f'failed: {e}'\n\
\x20   else:\n\
\x20       body = 'answered'\n\
\x20   body = body.encode()\n\
\x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
\x20   return [body]\n";

/// Where a container listens on its own network: its address there and
/// the port its app binds.
fn address_of(c: &ContainerSummary) -> (String, u16) {
    let nets = c.network_settings.as_ref().and_then(|n| n.networks.as_ref()).expect("networks");
    assert_eq!(nets.len(), 1, "{nets:?}");
    let (name, ep) = nets.iter().next().expect("one network");
    assert!(name != "bridge" && name != "host", "on the shared network {name}");
    let port = c.ports.as_ref().and_then(|p| p.first()).map(|p| p.private_port).expect("a published port");
    (ep.ip_address.clone().expect("ip"), port)
}

#[test]
fn an_apps_container_cannot_reach_another_apps_container_past_the_proxy() {
    if !slow_tests_enabled("an_apps_container_cannot_reach_another_apps_container_past_the_proxy") {
        return;
    }
    ensure_base();
    let server = ContainerServer::start(&["alpha", "beta"]);
    let repo = dockerfile_app("unused", "replace");
    repo.write("app.py", CONNECT_APP);
    repo.commit("connect app");
    repo.deploy(&server, "alpha");
    repo.deploy(&server, "beta");
    let (alpha_ip, alpha_port) = address_of(&web_containers(&server, "alpha")[0]);
    let (beta_ip, beta_port) = address_of(&web_containers(&server, "beta")[0]);

    // The probe works: alpha reaches its own container on its network.
    let (status, body) = server.get("alpha", &format!("/connect/{alpha_ip}/{alpha_port}"));
    assert_eq!((status, body.as_str()), (200, "connected"));
    // beta's container is out of alpha's reach, while beta answers through
    // the proxy.
    let (status, body) = server.get("alpha", &format!("/connect/{beta_ip}/{beta_port}"));
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("failed"), "alpha reached beta's container at {beta_ip}:{beta_port}: {body}");
    assert_eq!(server.get("beta", "/"), (200, "answered".to_string()));

    // The app's network goes with the app.
    server.ok(&["apps", "destroy", "beta", "--confirm", "beta"]);
    let label = format!("{LABEL_APP}=beta");
    let left = block_on(async {
        let engine = Engine::connect().await.expect("engine");
        let filters = HashMap::from([("label".to_string(), vec![label, format!("{LABEL_SERVER}={}", server_id(&server.data()))])]);
        engine
            .docker()
            .list_networks(Some(bollard::query_parameters::ListNetworksOptionsBuilder::default().filters(&filters).build()))
            .await
            .expect("networks")
    });
    assert!(left.is_empty(), "beta's network outlived it: {left:?}");
}
