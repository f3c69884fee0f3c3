//! The pipeline's last steps for apps on the swarm (swarm track, issue
//! 12), and moving an app onto the swarm and back.
//!
//! Everything before activation is the same for both schedulers, and runs
//! once per deploy on this machine: the tree, the image (built only when
//! its inputs changed; a code-only push reuses it), the test gate and the
//! release phase. Activation differs: instead of starting processes, each
//! process type's service is pointed at the new release (its tree is
//! mounted, as containers mount it), and swarm rolls the tasks over,
//! start-first and gated by the app's health check, rolling back by itself
//! when a new task fails. The web service goes first and must be rolled
//! and routed (every routed task of the new release) before the release
//! is recorded live; the other types follow.
//!
//! Moving an app is a switch of the same kind: its services are started
//! beside the local processes, and the local ones are drained and stopped
//! only once the proxy routes to healthy tasks; moving back starts local
//! processes, switches the route to them, then removes the services.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{
    acquire, check_instance_total, instance_command, live_release, plural, relaunch, stop_old, switch_current, Actor, DRAIN_TIMEOUT,
};
use crate::build::Environment;
use crate::manifest::{Manifest, ProcessSpec};
use crate::names::AppName;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::runtime::swarm::{self as tasks, Applied, HealthCheck, Rollout, ServicePlan, TaskInfo};
use crate::store::{Release, Scheduler};
use crate::task_routes::{RouteSpec, Routed};

/// Make `release` live on the swarm (see the module's opening).
pub(super) async fn activate(
    p: &Platform,
    app: &AppName,
    release: &Release,
    manifest: &Manifest,
    env: Option<&Environment>,
    progress: &Progress,
) -> Result<()> {
    let tree = p.layout.release(app, release.tree);
    if p.images.get(&tree).is_none() {
        bail!(
            "{app} runs on the swarm, where apps run in containers, and v{} has no image: give it a Dockerfile or `[docker] image = \"python\"` in slipway.toml, or move it back (`slipway scheduler set {app} local`)",
            release.version
        );
    }
    let statics = crate::proxy::Statics::resolve(&tree, &manifest.statics)?;
    let a = app.clone();
    let scale = p.store.call(move |s| s.scale(&a)).await?;
    check_instance_total(manifest, &scale)?;
    let count = |t: &str| scale.get(t).copied().unwrap_or(1);
    let server = crate::container::server_id(p.layout.root());
    let names: Vec<String> = manifest.processes.iter().map(|s| tasks::service_name(&server, app.as_str(), &s.name)).collect();

    p.register_routes(app).await;
    let mut routes = p.task_routes.follow(p.proxy.clone(), p.logs.app(app), app.as_str(), route_spec(p, app, manifest, names.clone()));

    // 1. The web service, gated on its health and on the route.
    let web = match manifest.process("web") {
        Some(spec) => {
            let n = count("web");
            progress.step(&format!("rolling {n} web task{} of v{} on the swarm", plural_s(n), release.version));
            let applied = apply_type(p, app, release, spec, n, env, manifest).await?;
            let within = rollout_deadline(manifest, n);
            if let Err(e) = wait_rolled(&applied, release, n, Some(&mut routes), within, false).await {
                return Err(e.context(format!("the swarm kept {app}'s previous tasks")));
            }
            progress.info(&format!("healthy: {} web task{} of v{} routed", n, plural_s(n), release.version));
            Some(applied)
        }
        None => None,
    };

    // 2. The record: `current`, the static files and the store.
    let link = p.layout.current(app);
    let previous_target = tokio::fs::read_link(&link).await.ok();
    let (a, v) = (app.clone(), release.version);
    let switched = match switch_current(&link, &tree).await {
        Ok(()) => p
            .store
            .call(move |s| {
                s.mark_live(&a, v)?;
                s.set_stopped(&a, false)
            })
            .await
            .context("recording the switch"),
        Err(e) => Err(e),
    };
    if let Err(e) = switched {
        if let Some(prev) = &previous_target {
            let _ = switch_current(&link, prev).await;
        }
        if let Some(w) = &web {
            if let Err(r) = tasks::roll_back(&w.name).await {
                progress.info(&format!("rolling the web service back failed too: {r:#}"));
            }
        }
        return Err(e);
    }
    p.proxy.set_statics(app.as_str(), statics);
    progress.step(&format!("switched traffic to v{}", release.version));

    // 3. The other types: no traffic to gate on; a failure is said, and
    //    swarm has rolled that service back.
    for spec in manifest.processes.iter().filter(|s| s.name != "web") {
        let n = count(&spec.name);
        progress.step(&format!("rolling {n} {} task{} of v{}", spec.name, plural_s(n), release.version));
        let rolled = match apply_type(p, app, release, spec, n, env, manifest).await {
            Ok(applied) => wait_rolled(&applied, release, n, None, rollout_deadline(manifest, n), false).await,
            Err(e) => Err(e),
        };
        if let Err(e) = rolled {
            progress.info(&format!("{}: {e:#}", spec.name));
        }
    }

    // 4. Services of types the release no longer has.
    for gone in tasks::services(&server, Some(app.as_str())).await?.into_iter().filter(|s| !names.contains(s)) {
        progress.step(&format!("removing service {gone}"));
        tasks::remove(&gone).await?;
    }
    Ok(())
}

/// Replace every task of the app (or of one type) by a rolling update.
pub(super) async fn restart(p: &Platform, app: &AppName, live: &Release, ptype: Option<&str>, progress: &Progress) -> Result<()> {
    let manifest = Manifest::load(&p.layout.release(app, live.tree))?;
    let a = app.clone();
    let scale = p.store.call(move |s| s.scale(&a)).await?;
    let server = crate::container::server_id(p.layout.root());
    // Web first: its restart is gated on health and on the route.
    let mut types: Vec<&ProcessSpec> = manifest.processes.iter().filter(|s| ptype.is_none_or(|t| t == s.name)).collect();
    if types.is_empty() {
        bail!("{app} has no process type {:?} in its Procfile", ptype.unwrap_or_default());
    }
    types.sort_by_key(|s| s.name != "web");
    for spec in types {
        let n = scale.get(&spec.name).copied().unwrap_or(1);
        progress.step(&format!("restarting {n} {} task{} of v{}", spec.name, plural_s(n), live.version));
        let applied = tasks::force_update(&tasks::service_name(&server, app.as_str(), &spec.name)).await?;
        let mut routes = (spec.name == "web").then(|| {
            let names = manifest.processes.iter().map(|s| tasks::service_name(&server, app.as_str(), &s.name)).collect();
            p.task_routes.follow(p.proxy.clone(), p.logs.app(app), app.as_str(), route_spec(p, app, &manifest, names))
        });
        wait_rolled(&applied, live, n, routes.as_mut(), rollout_deadline(&manifest, n), true).await?;
    }
    Ok(())
}

/// Stop the app's tasks: its services go (a start makes them again).
pub(super) async fn stop(p: &Platform, app: &AppName) -> Result<()> {
    p.task_routes.stop(app.as_str());
    remove_services(p, app).await
}

/// Remove every service of the app.
pub(super) async fn remove_services(p: &Platform, app: &AppName) -> Result<()> {
    let server = crate::container::server_id(p.layout.root());
    for name in tasks::services(&server, Some(app.as_str())).await? {
        tasks::remove(&name).await?;
    }
    if let Err(e) = tasks::remove_network(&server, app.as_str()).await {
        tracing::warn!(app = %app, error = %format!("{e:#}"), "removing the app's overlay network failed");
    }
    Ok(())
}

/// `slipway scheduler set APP swarm|local`: move the running app, with no
/// failed request.
pub async fn set_scheduler(p: &Platform, app: &AppName, actor: &Actor, to: Scheduler, progress: &Progress) -> Result<()> {
    let _guard = acquire(p, app, progress).await;
    let a = app.clone();
    let from = p.store.call(move |s| s.scheduler(&a)).await?;
    if from == to {
        progress.info(&format!("{app} already runs on the {} scheduler", to.as_str()));
        return Ok(());
    }
    if to == Scheduler::Swarm {
        tasks::check_manager().await?;
    }
    let started = Instant::now();
    let live = live_release(p, app).await?;
    let stopped = {
        let a = app.clone();
        p.store.call(move |s| s.is_stopped(&a)).await?
    };
    let result = match live {
        Some(live) if !stopped => match to {
            Scheduler::Swarm => onto_swarm(p, app, &live, progress).await,
            Scheduler::Local => off_swarm(p, app, &live, progress).await,
        },
        // Nothing runs: its next start or deploy runs it there.
        _ => Ok(()),
    };
    let result = match result {
        Ok(()) => {
            let a = app.clone();
            p.store.call(move |s| s.set_scheduler(&a, to)).await
        }
        Err(e) => Err(e),
    };
    if result.is_ok() {
        progress.step(&format!("{app} runs on the {} scheduler (moved in {:.1}s)", to.as_str(), started.elapsed().as_secs_f64()));
    }
    p.event(Some(app), actor, "scheduler", to.as_str(), super::outcome(&result)).await;
    result
}

/// Start the services beside the local processes; once the proxy routes
/// to healthy tasks, drain and stop the local ones.
async fn onto_swarm(p: &Platform, app: &AppName, live: &Release, progress: &Progress) -> Result<()> {
    let tree = p.layout.release(app, live.tree);
    let manifest = Manifest::load(&tree)?;
    super::ensure_app_dirs(p, app).await?;
    if !crate::runtime::container::prepare(&p.images, &p.layout, app, &tree, &manifest, None, progress).await? {
        bail!(
            "{app} runs on the host; on the swarm apps run in containers: give it a Dockerfile or `[docker] image = \"python\"` in slipway.toml and deploy it first"
        );
    }
    let local_upstreams = p.proxy.upstreams(app.as_str());
    let env = super::release_env(p, app, live);
    if let Err(e) = activate(p, app, live, &manifest, env.as_ref(), progress).await {
        p.task_routes.stop(app.as_str());
        p.proxy.set_upstreams(app.as_str(), local_upstreams);
        if let Err(r) = remove_services(p, app).await {
            progress.info(&format!("removing the new services failed: {r:#}"));
        }
        return Err(e);
    }
    let old = p.supervisor.take_all(app.as_str());
    if !p.proxy.drain(&local_upstreams, DRAIN_TIMEOUT).await {
        progress.info("local processes still busy after 30s: stopping them anyway");
    }
    progress.step(&format!("stopping {} local process{}", old.len(), plural(old.len())));
    stop_old(old, progress).await;
    Ok(())
}

/// Start local processes, switch the route to them, drain the tasks and
/// remove the services.
async fn off_swarm(p: &Platform, app: &AppName, live: &Release, progress: &Progress) -> Result<()> {
    p.task_routes.stop(app.as_str());
    let swarm_upstreams = p.proxy.upstreams(app.as_str());
    let a = app.clone();
    p.store.call(move |s| s.set_scheduler(&a, Scheduler::Local)).await?;
    if let Err(e) = relaunch(p, app, live.version, progress).await {
        let a = app.clone();
        p.store.call(move |s| s.set_scheduler(&a, Scheduler::Swarm)).await?;
        let tree = p.layout.release(app, live.tree);
        if let Ok(manifest) = Manifest::load(&tree) {
            let server = crate::container::server_id(p.layout.root());
            let names = manifest.processes.iter().map(|s| tasks::service_name(&server, app.as_str(), &s.name)).collect();
            p.task_routes.follow(p.proxy.clone(), p.logs.app(app), app.as_str(), route_spec(p, app, &manifest, names));
        }
        return Err(e);
    }
    if !p.proxy.drain(&swarm_upstreams, DRAIN_TIMEOUT).await {
        progress.info("tasks still busy after 30s: stopping them anyway");
    }
    progress.step("removing the app's services");
    remove_services(p, app).await
}

/// What the app's route follows.
fn route_spec(p: &Platform, app: &AppName, manifest: &Manifest, services: Vec<String>) -> RouteSpec {
    RouteSpec { services, web: manifest.process("web").is_some(), host: p.app_host(app), health_path: manifest.health_path.clone() }
}

/// Create or update one type's service for `release`.
async fn apply_type(
    p: &Platform,
    app: &AppName,
    release: &Release,
    spec: &ProcessSpec,
    replicas: u32,
    env: Option<&Environment>,
    manifest: &Manifest,
) -> Result<Applied> {
    let web = spec.name == "web";
    let port = web.then_some(tasks::TASK_PORT);
    let command = instance_command(p, app, release, spec, 0, env, port, false);
    let health = web.then(|| HealthCheck { path: manifest.health_path.clone(), host: p.app_host(app), within: manifest.health_timeout });
    tasks::apply(&ServicePlan { app: app.as_str(), ptype: &spec.name, release: release.version, command: &command, replicas, health }).await
}

/// How long a rollout of `n` tasks may take: each new task has the health
/// timeout to pass, and swarm replaces them one at a time.
fn rollout_deadline(manifest: &Manifest, n: u32) -> Duration {
    manifest.health_timeout * (n + 1) + Duration::from_secs(60)
}

/// Wait until the service runs `replicas` tasks of `release` and no other
/// (and, for web, the proxy routes to exactly those); fail when swarm
/// rolls the update back, once the rollback is done (the old tasks serve
/// again when the deploy is refused). `forced`: the tasks are replaced though their
/// release stays (a restart), so only a completed update counts.
async fn wait_rolled(
    applied: &Applied,
    release: &Release,
    replicas: u32,
    mut routes: Option<&mut tokio::sync::watch::Receiver<Vec<Routed>>>,
    within: Duration,
    forced: bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let want = format!("v{}", release.version);
    loop {
        let state = tasks::rollout(applied).await?;
        let list = tasks::tasks(std::slice::from_ref(&applied.name)).await?;
        if let Rollout::Failed(why) = &state {
            bail!("{}", failure(&applied.name, why, &list, &want));
        }
        let rolling_back = matches!(state, Rollout::RollingBack(_));
        let settled = match state {
            Rollout::Completed => true,
            Rollout::Pending => !forced,
            _ => false,
        };
        let new = list.iter().filter(|t| t.wanted && t.running && t.release == want).count() as u32;
        let others = list.iter().filter(|t| t.wanted && t.release != want).count();
        let routed = match routes.as_deref_mut() {
            Some(r) => {
                let r = r.borrow_and_update();
                r.len() as u32 == replicas && r.iter().all(|t| t.release == want)
            }
            None => true,
        };
        if !rolling_back && settled && new == replicas && others == 0 && routed {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if let Rollout::RollingBack(why) = &state {
                bail!("{}", failure(&applied.name, &format!("{why}; the rollback is still under way"), &list, &want));
            }
            let _ = tasks::roll_back(&applied.name).await;
            bail!("{}", failure(&applied.name, &format!("not done within {}s", within.as_secs()), &list, &want));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why a rollout failed, with what its new tasks said.
fn failure(service: &str, why: &str, list: &[TaskInfo], want: &str) -> String {
    let mut out = format!("the swarm rolled {service} back ({why})");
    let mut said: Vec<String> = Vec::new();
    for t in list.iter().filter(|t| t.release == want) {
        let what = match &t.error {
            Some(e) => format!("{} on {}: {} ({e})", t.id.get(..12).unwrap_or(&t.id), t.node, t.state),
            None => continue,
        };
        if !said.contains(&what) && said.len() < 3 {
            said.push(what);
        }
    }
    if !said.is_empty() {
        out.push_str(&format!("; new tasks: {}", said.join("; ")));
    }
    out
}

/// The app's tasks, for `ps`.
pub async fn app_tasks(p: &Platform, app: &AppName) -> Result<Vec<TaskInfo>> {
    let server = crate::container::server_id(p.layout.root());
    let names = tasks::services(&server, Some(app.as_str())).await?;
    let mut list = tasks::tasks(&names).await?;
    list.retain(|t| t.wanted || t.running);
    list.sort_by(|a, b| (&a.ptype, a.slot).cmp(&(&b.ptype, b.slot)));
    Ok(list)
}

/// `slipway nodes`: each node of the swarm, and which of this daemon's
/// tasks run there (`APP TYPE.SLOT`).
pub async fn nodes(p: &Platform) -> Result<Vec<(tasks::NodeInfo, Vec<String>)>> {
    let server = crate::container::server_id(p.layout.root());
    let nodes = tasks::nodes().await?;
    let names = tasks::services(&server, None).await?;
    let all = tasks::tasks(&names).await?;
    Ok(nodes
        .into_iter()
        .map(|n| {
            let here: Vec<String> = all
                .iter()
                .filter(|t| t.wanted && t.node == n.hostname)
                .map(|t| format!("{} {}.{} ({})", t.app, t.ptype, t.slot, t.release))
                .collect();
            (n, here)
        })
        .collect())
}

fn plural_s(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
