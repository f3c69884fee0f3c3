//! The swarm kind of process (swarm track, issue 12): each process type of
//! an app on the swarm is a service of the swarm the engine manages,
//! `slipway-APP-TYPE-SERVERID`, whose tasks run the release's image (named
//! by its id: no registry on one node) with the release tree mounted as
//! the container kind mounts it, as the app's uid, read-only, without
//! capabilities, under `[processes.X]` limits, on the app's own overlay
//! network (`slipway-APP-SERVERID-swarm`): another app's tasks cannot
//! reach its tasks there, only through the proxy.
//!
//! Swarm does the rolling: updates start each new task first, wait for its
//! Docker health check (the app's own `[healthcheck]`, asked from inside
//! the task), then stop an old one, and roll back by themselves when a new
//! task fails. What swarm cannot do here (no routing mesh, no VIPs) slipway
//! does: web tasks publish their port in host mode on a port the engine
//! picks, and `task_routes` points the proxy at each running task's port
//! on its node. A web task's stop signal waits [`STOP_DELAY`] before it
//! reaches the app, so the proxy has stopped sending it requests by then.
//!
//! Services carry the daemon's identity (`slipway.server`); their task
//! containers carry it under [`LABEL_SWARM_SERVER`] instead (and a blank
//! `slipway.server`, over the one their image has), so the clean-up of a
//! local daemon's leftover containers never touches the swarm's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, EndpointSpec, EndpointSpecModeEnum,
    HealthConfig, Limit, LocalNodeState, Mount, NetworkAttachmentConfig, MountTmpfsOptions, MountType, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    ServiceSpecRollbackConfig, ServiceSpecRollbackConfigFailureActionEnum, ServiceSpecRollbackConfigOrderEnum, ServiceSpecUpdateConfig,
    ServiceSpecUpdateConfigFailureActionEnum, ServiceSpecUpdateConfigOrderEnum, ServiceUpdateStatus, ServiceUpdateStatusStateEnum,
    TaskSpec, TaskSpecContainerSpec, TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{ListServicesOptionsBuilder, ListTasksOptionsBuilder, LogsOptionsBuilder, UpdateServiceOptionsBuilder};
use futures_util::Stream;

use super::container::{binds, container_env, exec_simple, masked};
use super::ProcessCommand;
use crate::container::{self as engine, Engine};

/// On task containers: the daemon that runs the service (not
/// `slipway.server`, which marks containers a daemon may remove at start).
pub const LABEL_SWARM_SERVER: &str = "slipway.swarm.server";

/// The port web tasks listen on inside their own network namespace; the
/// engine publishes it on a port of its choice on the task's node.
pub const TASK_PORT: u16 = 5000;

/// How long a web task's stop signal is held before it reaches the app:
/// the proxy polls tasks twice a second and drops a task as soon as swarm
/// marks it for shutdown, so by then no new request goes to it.
pub const STOP_DELAY: Duration = Duration::from_secs(2);

/// After each task is replaced, how long swarm watches it for a failure
/// before the next (a failure then rolls the service back).
const UPDATE_MONITOR: Duration = Duration::from_secs(2);

/// Holds the stop signal for `STOP_DELAY`, then forwards it; HUP goes
/// through at once. `$@` is the app's own command.
const DRAINING_WRAPPER: &str = r#""$@" &
child=$!
trap 'sleep 2; kill -TERM $child 2>/dev/null' TERM INT
trap 'kill -HUP $child 2>/dev/null' HUP
while :; do
  wait $child
  status=$?
  kill -0 $child 2>/dev/null || exit $status
done"#;

/// The app's health check, run by the engine inside each web task.
const HEALTH_SCRIPT: &str = "import http.client, os, sys\n\
c = http.client.HTTPConnection('127.0.0.1', int(os.environ['PORT']), timeout=5)\n\
c.request('GET', sys.argv[1], headers={'Host': sys.argv[2], 'X-Forwarded-Proto': 'http'})\n\
sys.exit(0 if 200 <= c.getresponse().status < 300 else 1)\n";

/// What one process type's service runs.
pub struct ServicePlan<'a> {
    pub app: &'a str,
    pub ptype: &'a str,
    pub release: u32,
    /// Its command, environment and user, with the container placement of
    /// its release (image, mounts, limits, stop signal).
    pub command: &'a ProcessCommand,
    pub replicas: u32,
    /// Web tasks: their health check. `None`: a task is up once started.
    pub health: Option<HealthCheck>,
}

/// The app's `[healthcheck]`, as the engine runs it inside a task.
pub struct HealthCheck {
    pub path: String,
    pub host: String,
    /// How long a new task has to pass it (the app's health timeout).
    pub within: Duration,
}

/// A service created or updated: its name and the update status it had
/// before (a status other than that one is this change's).
pub struct Applied {
    pub name: String,
    pub before: Option<ServiceUpdateStatus>,
}

/// Where a rolling update stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Rollout {
    /// No update under way since ours began (none was needed, or it has
    /// not been picked up yet), or it is running.
    Pending,
    Updating,
    Completed,
    /// Swarm is rolling it back: the message says why.
    RollingBack(String),
    /// Swarm rolled it back (or paused it): the message says why.
    Failed(String),
}

/// One task of a service, as the proxy and `ps` need it.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub id: String,
    pub app: String,
    pub ptype: String,
    pub release: String,
    pub slot: i64,
    pub node: String,
    /// Where its published web port is reached (the node's address).
    pub addr: Option<SocketAddr>,
    pub state: String,
    /// Running (and healthy, for tasks with a health check: swarm keeps
    /// them `starting` until then).
    pub running: bool,
    /// Swarm wants it to keep running (false: it is being stopped).
    pub wanted: bool,
    pub error: Option<String>,
    pub since: Option<String>,
}

/// A node of the swarm.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub hostname: String,
    pub role: String,
    pub state: String,
    pub availability: String,
    pub addr: String,
}

/// The name of `app`'s service for `ptype` under the daemon `server`.
pub fn service_name(server: &str, app: &str, ptype: &str) -> String {
    format!("slipway-{app}-{ptype}-{server}")
}

/// Refuse unless the engine is a manager of an active swarm.
pub async fn check_manager() -> Result<()> {
    let engine = Engine::connect().await?;
    let info = engine.docker().info().await.context("asking the engine about its swarm")?;
    let swarm = info.swarm.unwrap_or_default();
    if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
        bail!("the engine is not part of a swarm: make it one first (`docker swarm init`), or join it to one");
    }
    if swarm.control_available != Some(true) {
        bail!("the engine is a swarm worker: slipway must run beside a manager to create services");
    }
    Ok(())
}

/// Create the service of `plan`, or update it to `plan` (a rolling,
/// start-first update when its tasks change).
pub async fn apply(plan: &ServicePlan<'_>) -> Result<Applied> {
    let spec = service_spec(plan)?;
    let name = spec.name.clone().unwrap_or_default();
    let engine = Engine::connect().await?;
    let server = server_of(plan)?;
    let labels = HashMap::from([
        (engine::LABEL_APP.to_string(), plan.app.to_string()),
        (engine::LABEL_SERVER.to_string(), server.clone()),
        (LABEL_SWARM_SERVER.to_string(), server.clone()),
    ]);
    engine.ensure_network(&network_name(&server, plan.app), "overlay", &labels).await?;
    let docker = engine.docker();
    match docker.inspect_service(&name, None::<bollard::query_parameters::InspectServiceOptions>).await {
        Ok(current) => {
            let version = current.version.and_then(|v| v.index).ok_or_else(|| anyhow!("service {name} has no version"))?;
            let opts = UpdateServiceOptionsBuilder::default().version(version as i32).build();
            docker.update_service(&name, spec, opts, None).await.with_context(|| format!("updating service {name}"))?;
            Ok(Applied { name, before: current.update_status })
        }
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
            docker.create_service(spec, None).await.with_context(|| format!("creating service {name}"))?;
            Ok(Applied { name, before: None })
        }
        Err(e) => Err(e).with_context(|| format!("inspecting service {name}")),
    }
}

/// Replace every task of the service (a restart), rolling as an update.
pub async fn force_update(name: &str) -> Result<Applied> {
    update_current(name, "restarting", None, |spec| {
        if let Some(t) = spec.task_template.as_mut() {
            t.force_update = Some(t.force_update.unwrap_or(0) + 1);
        }
    })
    .await
}

/// Put the service back on its previous spec (a deploy that failed after
/// swarm had finished rolling it).
pub async fn roll_back(name: &str) -> Result<()> {
    update_current(name, "rolling back", Some("previous"), |_| {}).await.map(|_| ())
}

/// Update the service from its current spec, changed by `edit` (`what`
/// names the change in errors; `rollback`: the API's rollback flag).
async fn update_current(name: &str, what: &str, rollback: Option<&str>, edit: impl FnOnce(&mut ServiceSpec)) -> Result<Applied> {
    let engine = Engine::connect().await?;
    let docker = engine.docker();
    let current = docker
        .inspect_service(name, None::<bollard::query_parameters::InspectServiceOptions>)
        .await
        .with_context(|| format!("inspecting service {name}"))?;
    let version = current.version.and_then(|v| v.index).ok_or_else(|| anyhow!("service {name} has no version"))?;
    let mut spec = current.spec.ok_or_else(|| anyhow!("service {name} has no spec"))?;
    edit(&mut spec);
    let mut opts = UpdateServiceOptionsBuilder::default().version(version as i32);
    if let Some(r) = rollback {
        opts = opts.rollback(r);
    }
    docker.update_service(name, spec, opts.build(), None).await.with_context(|| format!("{what} service {name}"))?;
    Ok(Applied { name: name.to_string(), before: current.update_status })
}

/// Where the update of `applied` stands.
pub async fn rollout(applied: &Applied) -> Result<Rollout> {
    let engine = Engine::connect().await?;
    let service = engine
        .docker()
        .inspect_service(&applied.name, None::<bollard::query_parameters::InspectServiceOptions>)
        .await
        .with_context(|| format!("inspecting service {}", applied.name))?;
    let status = service.update_status;
    if status == applied.before {
        return Ok(Rollout::Pending);
    }
    let Some(status) = status else { return Ok(Rollout::Pending) };
    let why = status.message.clone().unwrap_or_default();
    Ok(match status.state {
        Some(ServiceUpdateStatusStateEnum::UPDATING) => Rollout::Updating,
        Some(ServiceUpdateStatusStateEnum::COMPLETED) => Rollout::Completed,
        Some(ServiceUpdateStatusStateEnum::ROLLBACK_STARTED) => Rollout::RollingBack(why),
        Some(
            ServiceUpdateStatusStateEnum::PAUSED
            | ServiceUpdateStatusStateEnum::ROLLBACK_PAUSED
            | ServiceUpdateStatusStateEnum::ROLLBACK_COMPLETED,
        ) => Rollout::Failed(why),
        _ => Rollout::Pending,
    })
}

/// The tasks of `services` that swarm still knows (running, starting,
/// stopping and recently ended ones).
pub async fn tasks(services: &[String]) -> Result<Vec<TaskInfo>> {
    if services.is_empty() {
        return Ok(Vec::new());
    }
    let engine = Engine::connect().await?;
    let docker = engine.docker();
    let filters = HashMap::from([("service".to_string(), services.to_vec())]);
    let list = match docker.list_tasks(Some(ListTasksOptionsBuilder::default().filters(&filters).build())).await {
        Ok(l) => l,
        // A service removed meanwhile.
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e).context("listing swarm tasks"),
    };
    let nodes: HashMap<String, NodeInfo> = nodes_of(&engine).await?.into_iter().map(|n| (n.id.clone(), n)).collect();
    Ok(list
        .into_iter()
        .filter_map(|t| {
            let labels = t.spec.as_ref()?.container_spec.as_ref()?.labels.clone().unwrap_or_default();
            let status = t.status.clone().unwrap_or_default();
            let node = t.node_id.as_ref().and_then(|id| nodes.get(id));
            let port = status
                .port_status
                .as_ref()
                .and_then(|p| p.ports.as_ref())
                .and_then(|ports| ports.iter().find_map(|p| p.published_port))
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0);
            let addr = match (node, port) {
                (Some(n), Some(port)) => Some(SocketAddr::new(node_ip(&n.addr), port)),
                _ => None,
            };
            Some(TaskInfo {
                id: t.id.clone()?,
                app: labels.get(engine::LABEL_APP).cloned().unwrap_or_default(),
                ptype: labels.get(engine::LABEL_TYPE).cloned().unwrap_or_default(),
                release: labels.get(engine::LABEL_RELEASE).cloned().unwrap_or_default(),
                slot: t.slot.unwrap_or(0),
                node: node.map(|n| n.hostname.clone()).unwrap_or_else(|| t.node_id.clone().unwrap_or_default()),
                addr,
                state: status.state.map(|s| s.to_string()).unwrap_or_default(),
                running: status.state == Some(TaskState::RUNNING),
                wanted: t.desired_state == Some(TaskState::RUNNING),
                error: status.err.clone().filter(|e| !e.is_empty()),
                since: status.timestamp.map(|t| t.to_string()),
            })
        })
        .collect())
}

/// The nodes of the swarm.
pub async fn nodes() -> Result<Vec<NodeInfo>> {
    let engine = Engine::connect().await?;
    nodes_of(&engine).await
}

async fn nodes_of(engine: &Engine) -> Result<Vec<NodeInfo>> {
    let list = engine.docker().list_nodes(None::<bollard::query_parameters::ListNodesOptions>).await.context("listing swarm nodes")?;
    Ok(list
        .into_iter()
        .map(|n| {
            let spec = n.spec.unwrap_or_default();
            let status = n.status.unwrap_or_default();
            let leader = n.manager_status.as_ref().and_then(|m| m.leader).unwrap_or(false);
            let role = spec.role.map(|r| r.to_string()).unwrap_or_default();
            NodeInfo {
                id: n.id.unwrap_or_default(),
                hostname: n.description.and_then(|d| d.hostname).unwrap_or_default(),
                role: if leader { format!("{role} (leader)") } else { role },
                state: status.state.map(|s| s.to_string()).unwrap_or_default(),
                availability: spec.availability.map(|a| a.to_string()).unwrap_or_default(),
                addr: status.addr.unwrap_or_default(),
            }
        })
        .collect())
}

/// A node's address as the proxy dials it: a node that advertises no
/// usable address is this machine.
fn node_ip(addr: &str) -> IpAddr {
    match addr.parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => ip,
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// The services this daemon runs, by name; only `app`'s when given.
pub async fn services(server: &str, app: Option<&str>) -> Result<Vec<String>> {
    let engine = Engine::connect().await?;
    let mut labels = vec![format!("{}={server}", engine::LABEL_SERVER)];
    if let Some(app) = app {
        labels.push(format!("{}={app}", engine::LABEL_APP));
    }
    let filters = HashMap::from([("label".to_string(), labels)]);
    let list = engine
        .docker()
        .list_services(Some(ListServicesOptionsBuilder::default().filters(&filters).build()))
        .await
        .context("listing services")?;
    Ok(list.into_iter().filter_map(|s| s.spec.and_then(|s| s.name)).collect())
}

/// Remove `app`'s overlay network once no task uses it any more (one
/// still attached keeps it: it is reused, or goes with the app).
pub async fn remove_network(server: &str, app: &str) -> Result<()> {
    let engine = Engine::connect().await?;
    let labels = [format!("{}={app}", engine::LABEL_APP), format!("{LABEL_SWARM_SERVER}={server}")];
    engine.remove_networks(&labels).await.map(|_| ())
}

/// The name of `app`'s overlay network: its tasks (all types) share it,
/// and no other app's tasks are on it; their published ports, which the
/// proxy uses, are the only way in from outside.
fn network_name(server: &str, app: &str) -> String {
    format!("slipway-{app}-{server}-swarm")
}

fn server_of(plan: &ServicePlan<'_>) -> Result<String> {
    let p = plan.command.container.as_ref().ok_or_else(|| anyhow!("{} {} has no image: on the swarm an app runs in containers", plan.app, plan.ptype))?;
    Ok(p.labels.get(engine::LABEL_SERVER).cloned().unwrap_or_default())
}

/// Remove a service: swarm stops its tasks (web tasks after [`STOP_DELAY`]).
pub async fn remove(name: &str) -> Result<()> {
    let engine = Engine::connect().await?;
    match engine.docker().delete_service(name).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing service {name}")),
    }
}

/// The output of one task, followed until it ends.
pub async fn task_output(task: &str) -> Result<impl Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>>> {
    let engine = Engine::connect().await?;
    // A task's output ends with the task: no request deadline.
    let docker = engine.docker().clone().with_timeout(Duration::from_secs(10 * 365 * 24 * 3600));
    let opts = LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build();
    Ok(docker.task_logs(task, Some(opts)))
}

/// The service spec of `plan`.
fn service_spec(plan: &ServicePlan<'_>) -> Result<ServiceSpec> {
    let cmd = plan.command;
    let server = server_of(plan)?;
    let p = cmd.container.as_ref().ok_or_else(|| anyhow!("{} {} has no image", plan.app, plan.ptype))?;
    let name = service_name(&server, plan.app, plan.ptype);
    let network = network_name(&server, plan.app);
    let release = format!("v{}", plan.release);
    let service_labels = HashMap::from([
        (engine::LABEL_APP.to_string(), plan.app.to_string()),
        (engine::LABEL_TYPE.to_string(), plan.ptype.to_string()),
        (engine::LABEL_RELEASE.to_string(), release.clone()),
        (engine::LABEL_SERVER.to_string(), server.clone()),
    ]);
    let task_labels = HashMap::from([
        (engine::LABEL_APP.to_string(), plan.app.to_string()),
        (engine::LABEL_TYPE.to_string(), plan.ptype.to_string()),
        (engine::LABEL_RELEASE.to_string(), release),
        (LABEL_SWARM_SERVER.to_string(), server),
        // A container inherits its image's labels, the daemon's identity
        // among them: blanked, so that no daemon takes a task for a local
        // container it left behind (and removes it at start).
        (engine::LABEL_SERVER.to_string(), String::new()),
    ]);
    let mut mounts: Vec<Mount> = binds(p)
        .into_iter()
        .map(|b| Mount {
            typ: Some(MountType::BIND),
            source: Some(b.source.display().to_string()),
            target: Some(b.target.display().to_string()),
            read_only: Some(b.read_only),
            ..Default::default()
        })
        .collect();
    let tmpfs = |target: String, size: i64, read_only: bool| Mount {
        typ: Some(MountType::TMPFS),
        target: Some(target),
        read_only: Some(read_only),
        tmpfs_options: Some(MountTmpfsOptions { size_bytes: Some(size), ..Default::default() }),
        ..Default::default()
    };
    mounts.push(tmpfs("/tmp".into(), 256 << 20, false));
    mounts.extend(masked(p).map(|m| tmpfs(m.display().to_string(), 4096, true)));

    let web = cmd.env.iter().any(|(k, _)| k == "PORT");
    let app_command = vec!["/bin/sh".to_string(), "-c".to_string(), exec_simple(&cmd.command)];
    let command = if web {
        let mut c = vec!["/bin/sh".to_string(), "-c".to_string(), DRAINING_WRAPPER.to_string(), "slipway-task".to_string()];
        c.extend(app_command);
        c
    } else {
        app_command
    };
    // SAFETY: geteuid/getegid have no preconditions.
    let user = cmd.user.map(|u| (u.uid, u.gid)).unwrap_or_else(|| unsafe { (libc::geteuid(), libc::getegid()) });
    let stop_signal = nix::sys::signal::Signal::try_from(p.stop_signal).map(|s| s.as_str().to_string()).unwrap_or_else(|_| "SIGTERM".into());
    let grace = Duration::from_millis(p.stop_timeout_ms) + if web { STOP_DELAY } else { Duration::ZERO };
    let health_check = plan.health.as_ref().map(|h| {
        let q = crate::build::shell_quote;
        let probe = format!("{} {} {}", q(HEALTH_SCRIPT), q(&h.path), q(&h.host));
        HealthConfig {
            test: Some(vec![
                "CMD-SHELL".into(),
                format!("for py in python3 python; do command -v $py >/dev/null && exec $py -c {probe}; done; exit 1"),
            ]),
            interval: Some(nanos(Duration::from_secs(1))),
            timeout: Some(nanos(Duration::from_secs(5))),
            retries: Some(3),
            start_period: Some(nanos(h.within)),
            ..Default::default()
        }
    });
    let container = TaskSpecContainerSpec {
        image: Some(p.image_id.clone()),
        labels: Some(task_labels),
        command: Some(command),
        env: Some(container_env(&cmd.env, p)),
        dir: Some(cmd.cwd.display().to_string()),
        user: Some(format!("{}:{}", user.0, user.1)),
        read_only: Some(true),
        mounts: Some(mounts),
        stop_signal: Some(stop_signal),
        stop_grace_period: Some(nanos(grace)),
        health_check,
        init: Some(true),
        capability_drop: Some(vec!["ALL".into()]),
        ..Default::default()
    };
    let resources = TaskSpecResources {
        limits: Some(Limit {
            nano_cpus: p.cpus.map(|c| (c * 1e9) as i64),
            memory_bytes: p.memory.map(|m| m as i64),
            pids: p.pids.map(i64::from),
        }),
        ..Default::default()
    };
    let ports = web.then(|| {
        vec![EndpointPortConfig {
            protocol: Some(EndpointPortConfigProtocolEnum::TCP),
            target_port: Some(i64::from(TASK_PORT)),
            // None: the engine picks a free port per task. A fixed one
            // deadlocks start-first updates on one node.
            published_port: None,
            publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
            ..Default::default()
        }]
    });
    Ok(ServiceSpec {
        name: Some(name),
        labels: Some(service_labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(resources),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                delay: Some(nanos(Duration::from_secs(1))),
                ..Default::default()
            }),
            networks: Some(vec![NetworkAttachmentConfig { target: Some(network), ..Default::default() }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(i64::from(plan.replicas)) }),
            ..Default::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(1),
            delay: Some(0),
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK),
            monitor: Some(nanos(UPDATE_MONITOR)),
            max_failure_ratio: Some(0.0),
            order: Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST),
        }),
        rollback_config: Some(ServiceSpecRollbackConfig {
            parallelism: Some(1),
            delay: Some(0),
            failure_action: Some(ServiceSpecRollbackConfigFailureActionEnum::PAUSE),
            monitor: Some(nanos(UPDATE_MONITOR)),
            max_failure_ratio: Some(0.0),
            order: Some(ServiceSpecRollbackConfigOrderEnum::START_FIRST),
        }),
        // No VIP (none works here): slipway's proxy finds the tasks itself.
        endpoint_spec: Some(EndpointSpec { mode: Some(EndpointSpecModeEnum::DNSRR), ports }),
        ..Default::default()
    })
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::runtime::container::ContainerPlacement;
    use crate::runtime::AppUser;

    fn web_command() -> ProcessCommand {
        let placement = ContainerPlacement {
            image: "slipway/shop:abc".into(),
            image_id: "sha256:0123".into(),
            labels: BTreeMap::from([(engine::LABEL_SERVER.to_string(), "srv1".to_string())]),
            read_only: vec![PathBuf::from("/data/apps/shop")],
            writable: vec![PathBuf::from("/data/apps/shop/data")],
            masked: vec![],
            memory: Some(256 << 20),
            cpus: Some(0.5),
            pids: Some(64),
            stop_signal: libc::SIGTERM,
            stop_timeout_ms: 10_000,
            ca_bundle: None,
            network: None,
        };
        ProcessCommand {
            command: "gunicorn app:app --bind 0.0.0.0:$PORT".into(),
            cwd: PathBuf::from("/data/apps/shop/releases/v3"),
            env: vec![("PATH".into(), "/host/bin".into()), ("PORT".into(), TASK_PORT.to_string()), ("SECRET".into(), "x".into())],
            user: Some(AppUser { uid: 20001, gid: 20001 }),
            limits: Default::default(),
            container: Some(Arc::new(placement)),
            cgroup: None,
        }
    }

    #[test]
    fn a_web_service_rolls_start_first_on_a_host_port_gated_by_the_apps_health_check() -> Result<()> {
        let cmd = web_command();
        let health = HealthCheck { path: "/up?x='1'".into(), host: "shop.localhost".into(), within: Duration::from_secs(30) };
        let plan = ServicePlan { app: "shop", ptype: "web", release: 3, command: &cmd, replicas: 2, health: Some(health) };
        let spec = service_spec(&plan)?;
        assert_eq!(spec.name.as_deref(), Some("slipway-shop-web-srv1"));
        let labels = spec.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(engine::LABEL_RELEASE).map(String::as_str), Some("v3"));
        let update = spec.update_config.clone().unwrap_or_default();
        assert_eq!(update.order, Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST));
        assert_eq!(update.failure_action, Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK));
        let ports = spec.endpoint_spec.and_then(|e| e.ports).unwrap_or_default();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].publish_mode, Some(EndpointPortConfigPublishModeEnum::HOST));
        assert_eq!(ports[0].published_port, None, "the engine picks the port");
        let task = spec.task_template.unwrap_or_default();
        let c = task.container_spec.unwrap_or_default();
        // By id: no registry is asked.
        assert_eq!(c.image.as_deref(), Some("sha256:0123"));
        assert_eq!(c.user.as_deref(), Some("20001:20001"));
        assert_eq!(c.read_only, Some(true));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_string()]));
        // The host's PATH stays out; the app's own variables go in.
        let env = c.env.unwrap_or_default();
        assert!(!env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
        assert!(env.contains(&"SECRET=x".to_string()));
        // The app's command runs under the wrapper that holds its stop signal.
        let command = c.command.unwrap_or_default();
        assert_eq!(command[2], DRAINING_WRAPPER);
        assert_eq!(command.last().map(String::as_str), Some("exec gunicorn app:app --bind 0.0.0.0:$PORT"));
        assert_eq!(c.stop_grace_period, Some(nanos(Duration::from_secs(12))));
        let probe = c.health_check.and_then(|h| h.test).unwrap_or_default();
        assert_eq!(probe[0], "CMD-SHELL");
        assert!(probe[1].contains(r"'/up?x='\''1'\'''"), "{}", probe[1]);
        // On the app's own overlay network, not the engine's shared bridge.
        let nets: Vec<Option<String>> = task.networks.clone().unwrap_or_default().into_iter().map(|n| n.target).collect();
        assert_eq!(nets, vec![Some("slipway-shop-srv1-swarm".to_string())]);
        let limits = task.resources.and_then(|r| r.limits).unwrap_or_default();
        assert_eq!((limits.memory_bytes, limits.nano_cpus, limits.pids), (Some(256 << 20), Some(500_000_000), Some(64)));
        Ok(())
    }

    #[test]
    fn a_worker_service_has_no_port_no_health_check_and_no_held_stop() -> Result<()> {
        let mut cmd = web_command();
        cmd.env.retain(|(k, _)| k != "PORT");
        let plan = ServicePlan { app: "shop", ptype: "worker", release: 3, command: &cmd, replicas: 1, health: None };
        let spec = service_spec(&plan)?;
        assert_eq!(spec.endpoint_spec.and_then(|e| e.ports), None);
        let c = spec.task_template.and_then(|t| t.container_spec).unwrap_or_default();
        assert_eq!(c.health_check, None);
        assert_eq!(c.command.unwrap_or_default()[2], "exec gunicorn app:app --bind 0.0.0.0:$PORT");
        assert_eq!(c.stop_grace_period, Some(nanos(Duration::from_secs(10))));
        Ok(())
    }
}
