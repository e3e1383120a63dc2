// The status page's script: ask for the API key when the gateway wants one, fetch the page's HTML
// fragments with it, refresh them every few seconds, download files.
// The key lives in this tab's sessionStorage and in the Authorization header of fetch calls, and
// nowhere else: never in a URL (the key input has no name, so even a form submitted without this
// script sends nothing), never in a cookie.
"use strict";

const REFRESH_MS = 3000;
const STORE = "samullm.api-key";
const $ = (id) => document.getElementById(id);
let loading = false;

function key() {
  return sessionStorage.getItem(STORE) || "";
}

async function api(path) {
  const headers = key() ? { Authorization: "Bearer " + key() } : {};
  return fetch(path, { headers, credentials: "omit", cache: "no-store" });
}

function route() {
  const id = decodeURIComponent(location.hash.slice(1));
  return id ? "/ui/fragments/batches/" + encodeURIComponent(id) : "/ui/fragments/batches";
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("forget").hidden = true;
  $("view").replaceChildren();
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("state").textContent = "";
  $("key").focus();
}

function localTimes(root) {
  for (const t of root.querySelectorAll("time[data-unix]")) {
    t.textContent = new Date(Number(t.dataset.unix) * 1000).toLocaleString();
  }
}

async function refresh() {
  if (loading) return;
  loading = true;
  try {
    const r = await api(route());
    if (r.status === 401) {
      const refused = key() !== "";
      sessionStorage.removeItem(STORE);
      askForKey(refused ? "That key was refused." : "");
      return;
    }
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      $("view").textContent = msg;
      return;
    }
    $("key-form").hidden = true;
    $("key-error").hidden = true;
    $("forget").hidden = !key();
    const view = $("view");
    view.innerHTML = await r.text();  // the gateway escapes every text in it
    localTimes(view);
    $("state").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("state").textContent = "gateway unreachable (" + e.message + "); retrying";
  } finally {
    loading = false;
  }
}

async function download(link) {
  const r = await api("/v1/files/" + encodeURIComponent(link.dataset.file) + "/content");
  if (!r.ok) {
    $("state").textContent = "download failed: " + r.status;
    return;
  }
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = link.dataset.name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = $("key").value.trim();
  $("key").value = "";
  if (!value) return;
  sessionStorage.setItem(STORE, value);
  refresh();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(STORE);
  askForKey("");
});

$("view").addEventListener("click", (ev) => {
  const link = ev.target.closest("a.download");
  if (link) {
    ev.preventDefault();
    download(link);
  }
});

window.addEventListener("hashchange", refresh);
refresh();
setInterval(() => { if ($("key-form").hidden) refresh(); }, REFRESH_MS);
