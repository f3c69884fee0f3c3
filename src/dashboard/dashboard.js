// slipway dashboard: the pages are rendered by the server; this script
// only streams (logs, an operation's output) and sends the buttons to the
// JSON API with the session's CSRF token. No framework, no build step.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const MAX_LOG_LINES = 2000;

  // Append text to a <pre>, keeping at most `max` lines and the view at
  // the bottom when it was there.
  function append(pre, text, max) {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent += text;
    const lines = pre.textContent.split("\n");
    if (lines.length > max) pre.textContent = lines.slice(lines.length - max).join("\n");
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }

  // Read a streamed response body, calling `onText` with each piece.
  async function stream(response, onText) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onText(decoder.decode(value, { stream: true }));
    }
  }

  // A long operation (rollback, restart, scale): its progress lines as they
  // come, then the outcome. The API answers with JSON lines.
  async function operation(path, body) {
    const out = document.getElementById("output");
    out.textContent = "";
    out.dataset.state = "running";
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify(body),
      });
    } catch (e) {
      append(out, "error: " + e + "\n", MAX_LOG_LINES);
      out.dataset.state = "failed";
      return;
    }
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      append(out, "error: " + (err.error || response.status) + "\n", MAX_LOG_LINES);
      out.dataset.state = "failed";
      return;
    }
    let pending = "";
    let ok = false;
    await stream(response, (text) => {
      pending += text;
      let i;
      while ((i = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, i);
        pending = pending.slice(i + 1);
        if (!line) continue;
        const msg = JSON.parse(line);
        if (msg.line !== undefined) append(out, msg.line + "\n", MAX_LOG_LINES);
        else if (msg.ok) { ok = true; append(out, "done\n", MAX_LOG_LINES); }
        else append(out, "error: " + msg.error + "\n", MAX_LOG_LINES);
      }
    });
    out.dataset.state = ok ? "done" : "failed";
    if (ok) setTimeout(() => location.reload(), 1500);
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const app = encodeURIComponent(b.dataset.app);
    if (b.dataset.action === "rollback") {
      operation("/api/apps/" + app + "/rollback", { version: b.dataset.version });
    } else if (b.dataset.action === "restart") {
      operation("/api/apps/" + app + "/restart", {});
    }
  });

  const scale = document.getElementById("scale");
  if (scale) {
    scale.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const counts = {};
      for (const input of scale.querySelectorAll("input[type=number]")) counts[input.name] = Number(input.value);
      operation("/api/apps/" + encodeURIComponent(scale.dataset.app) + "/scale", counts);
    });
  }

  // Live logs: the app's recent lines, then new ones as they are written
  // (deploy output included), reconnecting when the stream ends.
  const logs = document.getElementById("logs");
  if (logs) {
    const path = "/api/apps/" + encodeURIComponent(logs.dataset.app) + "/logs?follow=true&n=200";
    const follow = async () => {
      try {
        const response = await fetch(path, { credentials: "same-origin" });
        if (response.ok) {
          // The stream starts with the recent lines again: no doubles.
          logs.textContent = "";
          logs.dataset.state = "following";
          await stream(response, (text) => append(logs, text, MAX_LOG_LINES));
        }
      } catch (e) {
        // The server restarted or the network blinked: try again below.
      }
      logs.dataset.state = "reconnecting";
      setTimeout(follow, 2000);
    };
    follow();
  }
})();
