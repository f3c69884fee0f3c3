//! Real public Django sites deploy unchanged (issue 3). Slow: they install
//! dozens of packages and run hundreds of migrations, so they run when
//! SLIPWAY_SLOW_TESTS=1 (CI sets it), and say so when skipped.

mod util;

use std::time::Duration;

use util::*;

fn slow_tests_enabled(name: &str) -> bool {
    let on = std::env::var("SLIPWAY_SLOW_TESTS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("skipping {name}: set SLIPWAY_SLOW_TESTS=1 to run it");
    }
    on
}

/// Wagtail's own project template (wagtail start), run by uWSGI from its
/// Procfile, migrated by `yes "yes" | python manage.py migrate`, with its
/// production settings from config vars, its static files collected by the
/// build phase and served from `[static]`, its SQLite database and uploads
/// kept by `[storage]`.
#[test]
fn wagtail_site_under_uwsgi_deploys_and_keeps_its_data() {
    if !slow_tests_enabled("wagtail_site_under_uwsgi_deploys_and_keeps_its_data") {
        return;
    }
    let server = TestServer::start();
    server.ok(&["apps", "create", "wagtail"]);
    // What a Heroku user sets: the settings module and the secret. The
    // project keeps the template's layout (database, STATIC_ROOT and
    // MEDIA_ROOT inside it); slipway.toml maps them.
    server.ok(&["config", "set", "wagtail", "DJANGO_SETTINGS_MODULE=mysite.settings.production", "SECRET_KEY=a-test-secret-that-is-long-enough-for-django"]);
    let db = server.data().join("apps/wagtail/data/storage/db.sqlite3");
    let repo = AppRepo::example("wagtail-site");
    let out = repo.deploy(&server, "wagtail");
    assert!(out.contains("collectstatic"), "the build phase collects static files:\n{out}");
    assert!(out.contains("release phase: yes \"yes\" | python manage.py migrate"), "{out}");
    assert!(out.contains("Applying wagtailcore"), "{out}");
    let body = server.wait_body("wagtail", "Welcome to your new Wagtail site", Duration::from_secs(30));
    assert!(body.contains("/static/"), "{body}");
    assert!(db.is_file(), "the database lives in the app's storage");

    // Production settings (DEBUG off: Django serves no static file): the
    // admin's login page, and its hashed static files served by slipway's
    // proxy from the release's collected STATIC_ROOT.
    let (status, login) = server.get("wagtail", "/admin/login/");
    assert_eq!(status, 200, "{login}");
    assert!(login.contains("Sign in"), "{login}");
    let css = login
        .split('"')
        .find(|s| s.starts_with("/static/") && s.ends_with(".css"))
        .unwrap_or_else(|| panic!("no stylesheet on the login page:\n{login}"))
        .to_string();
    let (status, body) = server.get("wagtail", &css);
    assert_eq!(status, 200, "{css}: {body}");
    assert!(!body.is_empty(), "{css} is empty");

    let out = server.cli(&[
        "run", "wagtail", "--", "python", "manage.py", "shell", "-c",
        "from wagtail.models import Page; p = Page.objects.get(depth=2).specific; p.title = 'Kept across releases'; p.save_revision().publish(); print('renamed')",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("renamed"), "{:?} {} {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // A code change: new release, same database.
    repo.write("home/templates/home/welcome_page.html", &std::fs::read_to_string(repo.path().join("home/templates/home/welcome_page.html")).expect("template").replace("Welcome to your new Wagtail site!", "Welcome to the second release!"));
    repo.commit("second release");
    let out = repo.deploy(&server, "wagtail");
    assert!(out.contains("No migrations to apply"), "{out}");
    let body = server.wait_body("wagtail", "second release", Duration::from_secs(30));
    assert!(body.contains("Kept across releases"), "the data survived the release:\n{body}");
}
