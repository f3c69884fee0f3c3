//! Wheels built from sdists come from the app's own wheelhouse when its
//! dependencies change (issue 9 #5): uWSGI is compiled once, not on every
//! dependency change.

mod util;

use util::*;

#[test]
fn a_dependency_change_reuses_wheels_already_built_from_sdists() {
    let server = TestServer::start();
    // docopt 0.6.2 is published as an sdist only: installing it builds a wheel.
    let repo = AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\ndocopt==0.6.2\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
        ("app.py", &hello_app("wheels")),
    ]);
    let first = repo.deploy(&server, "wh");
    assert!(first.contains("Built docopt==0.6.2"), "the first build compiles the sdist:\n{first}");

    repo.write("requirements.txt", "gunicorn==27.0.1\ndocopt==0.6.2\nsix==1.17.0\n");
    repo.commit("add six");
    let second = repo.deploy(&server, "wh");
    assert!(second.contains("building environment"), "dependencies changed, a new environment:\n{second}");
    assert!(second.contains("+ six==1.17.0") && second.contains("+ docopt==0.6.2"), "{second}");
    assert!(!second.contains("Building docopt") && !second.contains("Built docopt"), "docopt was built again:\n{second}");
    let (code, body) = server.get("wh", "/");
    assert_eq!((code, body.as_str()), (200, "wheels world\n"));
}
