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
    repo.write("slipway.toml", "[processes.web]\nreload = \"signal:HUP\"\nmemory = \"256M\"\nprocesses = 100\ncpus = 0.5\n");
    repo.commit("limits");
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
    // [processes.web] limits are the container's, as the engine sees them.
    let web = web_containers(&server, "boxed");
    let id = web[0].id.clone().expect("id");
    let host = block_on(async { Engine::connect().await.expect("engine").docker().inspect_container(&id, None).await.expect("inspect") })
        .host_config
        .expect("host config");
    assert_eq!(host.memory, Some(256 << 20));
    assert_eq!(host.pids_limit, Some(100));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    // A one-off runs in the image, its piped stdin reaching the command.
    let mut run = std::process::Command::new(BIN)
        .args(["run", "boxed", "--", "sh", "-c", "test -f /.dockerenv && cat"])
        .env("SLIPWAY_URL", format!("http://{}", server.api))
        .env("SLIPWAY_TOKEN", &server.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("slipway run");
    std::io::Write::write_all(&mut run.stdin.take().expect("stdin"), b"hi from stdin\n").expect("write stdin");
    let out = run.wait_with_output().expect("slipway run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from stdin\n");

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

/// Tag the imported base as this daemon's test base; returns its name.
fn test_base(server: &ContainerServer) -> String {
    let tag = test_base_tag(&server_id(&server.data()));
    let (repo, t) = tag.split_once(':').expect("tag");
    block_on(async {
        let engine = Engine::connect().await.expect("engine");
        engine.tag_image("slipway/python:bookworm", repo, t).await.expect("tag the test base");
    });
    tag
}

/// Point the test base at a new image (the base plus a label): every
/// image key built on it changes, as after `import-base --force`.
fn move_test_base(server: &ContainerServer) -> String {
    let id = server_id(&server.data());
    let tag = test_base_tag(&id);
    let mut tar = tar::Builder::new(Vec::new());
    let dockerfile = b"FROM slipway/python:bookworm\nLABEL slipway.test=moved\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", &dockerfile[..]).expect("tar");
    let context = tar.into_inner().expect("tar");
    block_on(async {
        let engine = Engine::connect().await.expect("engine");
        let labels = HashMap::from([(LABEL_SERVER.to_string(), id.clone())]);
        engine.build(context, "Dockerfile", &tag, &labels, &slipway::progress::Progress::default()).await.expect("build the moved base")
    })
}

/// An app whose image is its base plus `marker.txt` (no network, builds
/// in a second) and whose stdlib server answers `MARKER TEXT`.
fn marker_app(base: &str, marker: &str, text: &str) -> AppRepo {
    AppRepo::new(&[
        ("Dockerfile", &format!("FROM {base}\nCOPY marker.txt /image-marker\n")),
        ("marker.txt", &format!("{marker}\n")),
        ("Procfile", "web: python3 app.py\n"),
        ("slipway.toml", "[processes.web]\nreload = \"replace\"\n"),
        ("app.py", &marker_server(text)),
    ])
}

fn marker_server(text: &str) -> String {
    format!(
        "import http.server, os\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       body = (open('/image-marker').read().strip() + ' {text}').encode()\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Length', str(len(body)))\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(body)\n\
         http.server.ThreadingHTTPServer(('0.0.0.0', int(os.environ['PORT'])), H).serve_forever()\n"
    )
}

/// The image the running web container of `app` was created from.
fn web_image(server: &ContainerServer, app: &str) -> String {
    let web = web_containers(server, app);
    assert_eq!(web.len(), 1, "{web:?}");
    web[0].image_id.clone().expect("image id")
}

/// Every tag the engine holds for an image id.
fn tags_of(id: &str) -> Vec<String> {
    block_on(async { Engine::connect().await.expect("engine").image(id).await.expect("inspect") }).map(|i| i.tags).unwrap_or_default()
}

#[test]
fn rollback_runs_the_releases_recorded_image_and_old_tags_are_retagged() {
    if !slow_tests_enabled("rollback_runs_the_releases_recorded_image_and_old_tags_are_retagged") {
        return;
    }
    ensure_base();
    let mut server = ContainerServer::start(&["pinned"]);
    let sid = server_id(&server.data());
    let base = test_base(&server);
    let repo = marker_app(&base, "m1", "one");
    repo.deploy(&server, "pinned");
    assert_eq!(server.get("pinned", "/").1, "m1 one");
    let v1_image = web_image(&server, "pinned");
    // The tag names this server; the record beside v1 names the image.
    let scoped: Vec<String> = tags_of(&v1_image).into_iter().filter(|t| t.starts_with(&format!("slipway/pinned:{sid}-"))).collect();
    assert_eq!(scoped.len(), 1, "{:?}", tags_of(&v1_image));
    let record = server.data().join("apps/pinned/releases/v1.image");
    let text = std::fs::read_to_string(&record).expect("v1.image");
    assert!(text.contains(&v1_image) && text.contains(&scoped[0]), "{text}");

    // An older daemon tagged images without its id and wrote no records:
    // a daemon started on its data retags the image, builds nothing.
    server.stop();
    let key = scoped[0].rsplit_once('-').expect("key").1.to_string();
    block_on(async {
        let engine = Engine::connect().await.expect("engine");
        engine.tag_image(&v1_image, "slipway/pinned", &key).await.expect("legacy tag");
        engine.remove_image(&scoped[0]).await.expect("untag");
    });
    std::fs::remove_file(&record).expect("remove the record");
    let images_before = image_ids_of(&server);
    server.restart();
    assert_eq!(server.get("pinned", "/").1, "m1 one");
    assert_eq!(web_image(&server, "pinned"), v1_image, "the old-style image runs again");
    assert_eq!(tags_of(&v1_image), vec![scoped[0].clone()], "retagged, the old tag dropped");
    assert_eq!(image_ids_of(&server), images_before, "nothing was built");
    assert!(record.is_file(), "the record is written again");

    // The base moves (imported again): v1's inputs hash to a new key now.
    move_test_base(&server);
    repo.write("marker.txt", "m2\n");
    repo.write("app.py", &marker_server("two"));
    repo.commit("new marker");
    let out = repo.deploy(&server, "pinned");
    assert!(out.contains("container deploy"), "{out}");
    assert_eq!(server.get("pinned", "/").1, "m2 two");

    // A restarted daemon knows nothing in memory: the rollback runs v1's
    // own image from its record, not a rebuild from v1's inputs.
    server.stop();
    server.restart();
    let out = server.ok(&["rollback", "pinned", "v1"]);
    assert!(out.contains(&format!("code deploy: image {} reused (the release's own image)", &v1_image[7..19])), "{out}");
    assert!(!out.contains("building"), "{out}");
    server.wait_body("pinned", "m1 one", Duration::from_secs(20));
    assert_eq!(web_image(&server, "pinned"), v1_image);
}

#[test]
fn images_prune_and_collection_leave_another_servers_images_alone() {
    if !slow_tests_enabled("images_prune_and_collection_leave_another_servers_images_alone") {
        return;
    }
    ensure_base();
    let server = ContainerServer::start(&["twin"]);
    let other = ContainerServer::start_with(&["twin"], &["--keep-releases", "1"]);
    let (mine, theirs) = (server_id(&server.data()), server_id(&other.data()));
    // The same app name and the same inputs on two servers of one engine:
    // v1 and v2, each its own image, and the images both run.
    let two_images = |server: &ContainerServer| {
        let repo = marker_app("slipway/python:bookworm", "m1", "one");
        repo.deploy(server, "twin");
        let v1 = web_image(server, "twin");
        repo.write("marker.txt", "m2\n");
        repo.commit("m2");
        repo.deploy(server, "twin");
        (v1, web_image(server, "twin"))
    };
    let (v1, v2) = two_images(&server);
    assert_ne!(v1, v2);
    // The other server builds the same inputs under its own tags; its
    // collection (--keep-releases 1) removes its v1 tag, never this one's.
    let (other_v1, other_v2) = two_images(&other);
    assert!(!tags_of(&other_v1).iter().any(|t| t.contains(&theirs)), "collected: {:?}", tags_of(&other_v1));
    assert!(!other.data().join("apps/twin/releases/v1.image").exists(), "v1's record went with its tree");
    assert!(tags_of(&v1).iter().any(|t| t.starts_with(&format!("slipway/twin:{mine}-"))), "{:?}", tags_of(&v1));
    other.ok(&["stop", "twin"]);
    assert!(web_containers(&other, "twin").is_empty());

    // Prune removes this server's unused image only.
    let out = std::process::Command::new(BIN).args(["images", "prune", "--data"]).arg(server.data()).output().expect("prune");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!tags_of(&v1).iter().any(|t| t.contains(&mine)), "this server's unused image went: {:?}", tags_of(&v1));
    assert!(tags_of(&v2).iter().any(|t| t.contains(&mine)), "the image in use stays");
    assert!(tags_of(&other_v2).iter().any(|t| t.starts_with(&format!("slipway/twin:{theirs}-"))), "{:?}", tags_of(&other_v2));
    // The other server starts its app from its own image, nothing built.
    other.ok(&["start", "twin"]);
    assert_eq!(other.get("twin", "/").1, "m2 one");
    assert_eq!(web_image(&other, "twin"), other_v2);
}

#[test]
fn generated_image_installs_a_uv_lock_with_uv_sync_and_refuses_a_pin_its_base_cannot_meet() {
    if !slow_tests_enabled("generated_image_installs_a_uv_lock_with_uv_sync_and_refuses_a_pin_its_base_cannot_meet") {
        return;
    }
    ensure_base();
    let server = ContainerServer::start(&["locked"]);
    let repo = AppRepo::new(&[
        ("pyproject.toml", include_str!("fixtures/uv-app/pyproject.toml")),
        ("uv.lock", include_str!("fixtures/uv-app/uv.lock")),
        ("Procfile", "web: gunicorn app:app --bind 0.0.0.0:$PORT --workers 1\n"),
        ("slipway.toml", "[docker]\nimage = \"python\"\n"),
        ("app.py", &probe_app("locked")),
    ]);
    let out = repo.deploy(&server, "locked");
    assert!(out.contains("uv sync --frozen"), "{out}");
    let (status, body) = server.get("locked", "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("locked container"), "{body}");

    // A pin the base's python3 cannot meet: refused before any build, in
    // one line naming both versions; v1 serves on.
    repo.write(".python-version", "3.99\n");
    repo.commit("pin");
    let out = repo.deploy_rejected(&server, "locked");
    let line = out.lines().find(|l| l.contains(".python-version pins python 3.99")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("the base image slipway/python:bookworm has python 3."), "{line}");
    assert!(!out.contains("building"), "{out}");
    assert!(server.get("locked", "/").1.starts_with("locked container"));
}

/// The web container serving `app` (its id).
fn web_container_id(server: &ContainerServer, app: &str) -> String {
    let web = web_containers(server, app);
    assert_eq!(web.len(), 1, "{web:?}");
    web[0].id.clone().expect("id")
}

#[test]
fn every_failure_kind_rejects_the_push_and_the_old_container_keeps_serving() {
    if !slow_tests_enabled("every_failure_kind_rejects_the_push_and_the_old_container_keeps_serving") {
        return;
    }
    ensure_base();
    // The daemon reaches the engine through a link the test can cut.
    let engine_dir = tempfile::tempdir().expect("tempdir");
    let link = engine_dir.path().join("docker.sock");
    std::os::unix::fs::symlink("/var/run/docker.sock", &link).expect("link");
    let docker_host = format!("unix://{}", link.display());
    let server = ContainerServer::start_with_env(&["faulty"], &[], &[("DOCKER_HOST", &docker_host)]);
    let base = "slipway/python:bookworm";
    let repo = marker_app(base, "m1", "one");
    repo.deploy(&server, "faulty");
    assert_eq!(server.get("faulty", "/").1, "m1 one");
    let serving = web_container_id(&server, "faulty");
    let good = repo.head();

    let toml = "[processes.web]\nreload = \"replace\"\n";
    let dockerfile = format!("FROM {base}\nCOPY marker.txt /image-marker\n");
    type Fault = (&'static str, Box<dyn Fn(&AppRepo)>, &'static str);
    let faults: Vec<Fault> = vec![
        (
            "bad dependency",
            Box::new(move |r: &AppRepo| {
                r.write(
                    "Dockerfile",
                    &format!("FROM {base}\nCOPY .slipway/ca.crt /ca.crt\nRUN python3 -m venv /v && SSL_CERT_FILE=/ca.crt PIP_CERT=/ca.crt /v/bin/pip install -q no-such-package-slipway-test==0.0.1\n"),
                )
            }),
            "the image build failed",
        ),
        ("failing test", Box::new(move |r: &AppRepo| r.write("slipway.toml", &format!("{toml}[test]\ncommand = \"exit 1\"\n"))), "test gate failed"),
        ("failing release phase", Box::new(move |r: &AppRepo| r.write("slipway.toml", &format!("{toml}[release]\ncommand = \"exit 4\"\n"))), "release phase failed"),
        (
            "crash on boot",
            Box::new(|r: &AppRepo| r.write("Procfile", "web: python3 -c 'import sys; print(\"boom in container\"); sys.exit(3)'\n")),
            "crashed on boot",
        ),
        (
            "never healthy",
            Box::new(move |r: &AppRepo| {
                r.write("app.py", &marker_server("sick").replace("send_response(200)", "send_response(503)"));
                r.write("slipway.toml", &format!("{toml}[healthcheck]\ntimeout = \"3s\"\n"));
            }),
            "did not pass its health check",
        ),
        (
            "unavailable interpreter",
            Box::new(|r: &AppRepo| {
                r.remove("Dockerfile");
                r.write("slipway.toml", "[docker]\nimage = \"python\"\n");
                r.write(".python-version", "3.99\n");
            }),
            ".python-version pins python 3.99",
        ),
        ("failing image build", Box::new(move |r: &AppRepo| r.write("Dockerfile", &format!("{dockerfile}RUN echo build-broke && exit 3\n"))), "the image build failed"),
    ];
    let check_unchanged = |kind: &str, out: &str| {
        assert_eq!(server.get("faulty", "/").1, "m1 one", "{kind}: the old container stopped serving\n{out}");
        assert_eq!(web_container_id(&server, "faulty"), serving, "{kind}: the serving container changed");
        let releases = server.json(&["releases", "faulty", "--json"]);
        let live: Vec<_> = releases.as_array().expect("list").iter().filter(|r| r["status"] == "live").map(|r| r["version"].clone()).collect();
        assert_eq!(live, vec![serde_json::Value::from("v1")], "{kind}: {releases}");
        assert_eq!(containers_of(&server).len(), 1, "{kind}: a new container was left behind");
    };
    for (kind, break_it, reason) in &faults {
        repo.git(&["reset", "-q", "--hard", &good]);
        break_it(&repo);
        repo.commit(kind);
        let out = repo.deploy_rejected(&server, "faulty");
        assert!(out.contains(reason), "{kind}: no {reason:?} in\n{out}");
        check_unchanged(kind, &out);
    }

    // The engine unreachable: the push says so and changes nothing; the
    // running container (its shim's connection made before) serves on.
    repo.git(&["reset", "-q", "--hard", &good]);
    repo.write("app.py", &marker_server("two"));
    repo.commit("code while the engine is away");
    std::fs::remove_file(&link).expect("unlink");
    std::os::unix::fs::symlink(engine_dir.path().join("dead.sock"), &link).expect("dead link");
    let out = repo.deploy_rejected(&server, "faulty");
    std::fs::remove_file(&link).expect("unlink");
    std::os::unix::fs::symlink("/var/run/docker.sock", &link).expect("link");
    assert!(out.contains("the docker engine is unreachable"), "{out}");
    check_unchanged("unreachable engine", &out);
}
