//! `slipway run`: one-offs attached to the caller. Plain: stdin forwarded,
//! stdout and stderr apart, signals passed, the exit code returned. With
//! `-t` (over the API, and `ssh -t` over SSH): a real terminal, driven
//! from here through a pseudo-terminal of the test's own, as a person at
//! a keyboard would: an interactive Python shell, Ctrl-C, window sizes.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use util::*;

#[test]
fn plain_one_off_forwards_stdin_and_keeps_stdout_and_stderr_apart() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "piped");
    let mut child = client(&server, &["run", "piped", "--", "sh", "-c", "read x; echo out:$x $SLIPWAY_APP; echo err:$x >&2; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slipway run");
    child.stdin.take().expect("stdin").write_all(b"hello\n").expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout.trim(), "out:hello piped", "stderr stays out of stdout");
    assert_eq!(stderr.trim(), "err:hello", "stdout stays out of stderr");

    let events = server.json(&["events", "piped", "--json"]);
    let run = events.as_array().into_iter().flatten().find(|e| e["action"] == "run").expect("a run event");
    assert!(run["detail"].as_str().unwrap_or("").contains("read x"), "the command is recorded: {run}");
    assert_eq!(run["outcome"], "exit 3", "{run}");
}

#[test]
fn interrupting_the_client_interrupts_the_command() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "interrupt");
    let script = "trap 'echo got-int; exit 9' INT; echo ready; while :; do sleep 0.2; done";
    let mut child = client(&server, &["run", "interrupt", "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slipway run");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready");
    signal(child.id() as i32, libc::SIGINT);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read");
    let status = child.wait().expect("wait");
    assert!(rest.contains("got-int"), "the command saw SIGINT: {rest:?}");
    assert_eq!(status.code(), Some(9));
}

#[test]
fn terminal_one_off_runs_an_interactive_python_shell() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "shell");
    let mut cmd = client(&server, &["run", "-t", "shell", "--", "python"]);
    cmd.env("TERM", "xterm");
    let mut term = Terminal::spawn(cmd, 100, 37);

    term.expect(">>> ");
    term.send("import os, sys, shutil, time; print('tty', os.isatty(0), os.environ['SLIPWAY_APP'], os.environ['TERM'])\r");
    term.expect("tty True shell xterm");
    term.send("print('size', tuple(shutil.get_terminal_size()))\r");
    term.expect("size (100, 37)");

    // The window changes here: the remote terminal follows.
    term.resize(120, 40);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        term.send("print('now', tuple(shutil.get_terminal_size()))\r");
        if term.wait_for("now (120, 40)", Duration::from_secs(2)) {
            break;
        }
        assert!(Instant::now() < deadline, "the window size never reached the command:\n{}", term.seen());
    }

    // Ctrl-C interrupts what runs, not the session.
    term.send("print('sl' + 'eeping'); time.sleep(60)\r");
    term.expect("sleeping");
    term.send("\x03");
    term.expect("KeyboardInterrupt");
    term.send("print('ans', 6 * 7)\r");
    term.expect("ans 42");

    term.send("exit(5)\r");
    assert_eq!(term.wait(), Some(5), "the exit code comes back:\n{}", term.seen());
    let events = server.json(&["events", "shell", "--json"]);
    let run = events.as_array().into_iter().flatten().find(|e| e["action"] == "run").expect("a run event");
    assert_eq!(run["detail"], "python");
    assert_eq!(run["outcome"], "exit 5");
}

#[test]
fn ssh_with_a_terminal_runs_a_shell_in_the_release() {
    let server = TestServer::start();
    AppRepo::hello("hello").deploy(&server, "sshell");
    let key = SshKey::new();
    server.ok(&["keys", "add", "me", "--key", &key.public()]);
    let mut args: Vec<String> = key.ssh_command().split_whitespace().skip(1).map(str::to_string).collect();
    args.extend(["-tt", "-p", server.ssh_port(), "git@127.0.0.1", "run", "sshell", "--", "bash"].map(String::from));
    let mut cmd = Command::new("ssh");
    cmd.args(&args).env("TERM", "xterm");
    let mut term = Terminal::spawn(cmd, 90, 30);

    term.send("echo ans $((6*7)) $SLIPWAY_APP $COLUMNS; tty; pwd\r");
    term.expect("ans 42 sshell");
    term.expect("/dev/pts/");
    term.expect("/releases/");
    // "sleeping" comes from inside the foreground job, after it took the
    // terminal: a Ctrl-C typed after bash's own `echo` but before the job's
    // child claimed the terminal would race bash's job control, which
    // hands the terminal to the job late and leaves bash reading from the
    // background (EIO, read as end of input: bash exits).
    term.send("sh -c 'echo sl\"\"eeping; exec sleep 60'\r");
    term.expect("sleeping");
    term.send("\x03");
    // The terminal flushes typeahead on Ctrl-C: type on at the next prompt.
    term.expect("^C");
    term.expect("$ ");
    term.send("echo after $((1+1))\r");
    term.expect("after 2");
    term.send("exit 4\r");
    assert_eq!(term.wait(), Some(4), "{}", term.seen());
}

fn client(server: &TestServer, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env("SLIPWAY_URL", format!("http://{}", server.api)).env("SLIPWAY_TOKEN", &server.token);
    c
}

/// A program on a pseudo-terminal of the test's own, read by a thread.
struct Terminal {
    master: OwnedFd,
    child: Child,
    rx: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    /// How far `expect` has consumed `seen`.
    pos: usize,
}

impl Terminal {
    fn spawn(mut cmd: Command, cols: u16, rows: u16) -> Terminal {
        use std::os::unix::process::CommandExt;
        let ws = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        let pair = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let slave = std::fs::File::from(pair.slave);
        cmd.stdin(slave.try_clone().expect("dup")).stdout(slave.try_clone().expect("dup")).stderr(slave);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on the terminal");
        drop(cmd);
        let mut reader = std::fs::File::from(pair.master.try_clone().expect("dup master"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Terminal { master: pair.master, child, rx, seen: Vec::new(), pos: 0 }
    }

    fn send(&mut self, keys: &str) {
        let mut f = std::fs::File::from(self.master.try_clone().expect("dup master"));
        f.write_all(keys.as_bytes()).expect("type");
    }

    fn resize(&mut self, cols: u16, rows: u16) {
        let ws = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from a live value.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const nix::pty::Winsize) };
        assert_eq!(r, 0, "resize the test's terminal");
    }

    /// Whether `needle` appears (after what earlier waits consumed) within `limit`.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let hay = String::from_utf8_lossy(&self.seen[self.pos..]).to_string();
            if let Some(i) = hay.find(needle) {
                // Consume up to the match, in bytes of the lossy text: the
                // terminal's output here is ASCII.
                self.pos += i + needle.len();
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(chunk) = self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                self.seen.extend_from_slice(&chunk);
            }
        }
    }

    /// `needle` must appear; the generous limit only bounds a broken run.
    fn expect(&mut self, needle: &str) {
        if !self.wait_for(needle, Duration::from_secs(60)) {
            panic!("never saw {needle:?} on the terminal; it showed:\n{}", self.seen());
        }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen).to_string()
    }

    /// The program's exit code.
    fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            while let Ok(chunk) = self.rx.try_recv() {
                self.seen.extend_from_slice(&chunk);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// integrity track (issue 10, low): app output with terminal control
// sequences (a window title, clearing the screen) reaches the operator's
// terminal through `logs` and `run` in a visible form, never raw.
#[test]
fn terminal_escapes_from_an_app_are_neutralised_in_logs_and_run() {
    let server = TestServer::start();
    let repo = AppRepo::hello("hello");
    repo.write(
        "Procfile",
        "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\nworker: printf '\\033]0;pwned\\007\\033[2J logged\\n'; exec sleep 100000\n",
    );
    repo.commit("escapes");
    repo.deploy(&server, "escapes");
    let raw = |b: &[u8]| b.iter().any(|&c| c == 0x1b || c == 0x07);

    let out = server.cli(&["run", "escapes", "--", "sh", "-c", "printf '\\033]0;pwned\\007\\033[2J ran\\n'; printf '\\033[31m err\\n' >&2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!raw(&out.stdout) && !raw(&out.stderr), "raw control bytes reached the terminal: {:?} {:?}", out.stdout, out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "^[]0;pwned^G^[[2J ran\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "^[[31m err");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = server.cli(&["logs", "escapes", "-n", "100"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!raw(&out.stdout), "raw control bytes in logs: {text:?}");
        if text.contains("logged") {
            assert!(text.contains("^[]0;pwned^G^[[2J logged"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "the worker's line never reached the log: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// issue 15 #4: `events` wraps its columns to the terminal's width (a table
// crate does the layout), and off a terminal keeps each row on one line.
#[test]
fn events_wrap_to_the_terminal_and_stay_whole_in_a_pipe() {
    let server = TestServer::start();
    let repo = AppRepo::hello("wrapped");
    // Under the 100 characters a release keeps of a subject; over 60.
    let subject = "a commit subject long enough that no sixty column terminal shows it on one line";
    repo.write("app.py", &hello_app("wrapped"));
    repo.commit(subject);
    repo.deploy(&server, "wrapped");

    let mut term = Terminal::spawn(client(&server, &["events", "wrapped"]), 60, 40);
    assert_eq!(term.wait(), Some(0), "{}", term.seen());
    term.wait_for("\u{0}", Duration::from_millis(500)); // what is left in the pipe
    let shown = term.seen().replace('\r', "");
    let widest = shown.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    assert!(widest <= 60, "a line wider than the terminal ({widest}):\n{shown}");
    let words: Vec<&str> = shown.split_whitespace().collect();
    for w in subject.split(' ') {
        assert!(words.contains(&w), "{w:?} of the subject is missing:\n{shown}");
    }

    let piped = server.ok(&["events", "wrapped"]);
    assert!(piped.lines().any(|l| l.contains(subject)), "off a terminal a row stays on one line:\n{piped}");
}
