// The receiver console: a tenant's tasks, one task in full, and a form to submit one.
// Plain script, no build step. Every bit of data reaches the page through textContent or a DOM
// property, never through innerHTML, so a prompt or an error message can never become markup.
"use strict";

(() => {
  const KEY_STORAGE = "receiver.apiKey";
  const MODE_STORAGE = "receiver.mode"; // "admin" when the key is the admin key, else an app's key
  const WAIT_SECONDS = 25; // long-poll length for a running task; the API holds the answer up to 60 s
  const PAGE_SIZE = 25;
  const STATUSES = ["queued", "submitted", "downloading", "succeeded", "failed", "cancelled"];
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const ASPECT_RATIOS = ["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21"];

  const view = document.getElementById("view");
  const keyView = document.getElementById("key-view");
  const keyForm = document.getElementById("key-form");
  const keyInput = document.getElementById("api-key");
  const keyError = document.getElementById("key-error");
  const nav = document.getElementById("nav");
  const forgetButton = document.getElementById("forget-key");
  const adminToggle = document.getElementById("admin-mode");

  let providersCache = null; // the /v1/providers items, fetched once per key
  let current = null; // the AbortController of the view on screen; aborted when the route changes

  // -- small DOM helpers ------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function formatBytes(size) {
    if (typeof size !== "number") return "";
    if (size < 1024) return `${size} B`;
    if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KiB`;
    return `${(size / 1024 / 1024).toFixed(2)} MiB`;
  }

  function timeNode(iso) {
    if (!iso) return el("span", { class: "muted", text: "—" });
    const date = new Date(iso);
    const text = Number.isNaN(date.getTime())
      ? iso
      : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
    return el("time", { datetime: iso, title: iso, text });
  }

  function seconds(fromIso, toIso) {
    const span = (new Date(toIso).getTime() - new Date(fromIso).getTime()) / 1000;
    return Number.isFinite(span) ? `${span.toFixed(span < 10 ? 2 : 1)} s` : "";
  }

  function statusBadge(status, id) {
    const running = !TERMINAL.has(status);
    return el(
      "span",
      { class: `status status-${STATUSES.includes(status) ? status : "unknown"}`, id, "data-status": status },
      running ? el("span", { class: "pulse", "aria-hidden": "true" }) : null,
      status,
    );
  }

  function isHttpUrl(value) {
    return typeof value === "string" && /^https?:\/\//i.test(value);
  }

  function randomToken() {
    // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(new DOMException("aborted", "AbortError"));
      });
    });
  }

  // -- the API ----------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `the service answered ${status}`);
      this.status = status;
      this.code = error.code || "";
      this.fields = error.fields || {};
    }
  }

  function storedKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  // Paths are relative ("v1/…"), so the console also works behind a proxy that adds a prefix.
  async function api(path, { method = "GET", body, headers = {}, signal, key } = {}) {
    const response = await fetch(path, {
      method,
      body,
      signal,
      cache: "no-store",
      headers: { ...headers, Authorization: `Bearer ${key || storedKey()}` },
    });
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const failure = new ApiFailure(response.status, data);
      if (response.status === 401 && !key) forgetKey("The service no longer accepts this key; enter it again.");
      throw failure;
    }
    return data;
  }

  async function providers(signal) {
    if (!providersCache) providersCache = (await api("v1/providers", { signal })).items;
    return providersCache;
  }

  // -- the key ----------------------------------------------------------------------------------

  function isAdmin() {
    return sessionStorage.getItem(MODE_STORAGE) === "admin";
  }

  function forgetKey(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    sessionStorage.removeItem(MODE_STORAGE);
    providersCache = null;
    keyError.hidden = !message;
    keyError.textContent = message || "";
    route();
  }

  keyForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return;
    const button = keyForm.querySelector("button");
    button.disabled = true;
    keyError.hidden = true;
    try {
      // The admin key opens the admin API only; an app's key the tasks. Each is checked where it works.
      if (adminToggle.checked) await api("v1/admin/keys", { key });
      else providersCache = (await api("v1/providers", { key })).items;
      sessionStorage.setItem(KEY_STORAGE, key);
      sessionStorage.setItem(MODE_STORAGE, adminToggle.checked ? "admin" : "app");
      keyInput.value = "";
      route();
    } catch (failure) {
      keyError.textContent =
        failure.status === 401 ? "This key is not valid for this service." : `Could not check the key: ${failure.message}`;
      keyError.hidden = false;
    } finally {
      button.disabled = false;
    }
  });

  forgetButton.addEventListener("click", () => forgetKey(""));

  // -- routing ----------------------------------------------------------------------------------

  function parseHash() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const at = hash.indexOf("?");
    const path = at < 0 ? hash : hash.slice(0, at);
    return { path, params: new URLSearchParams(at < 0 ? "" : hash.slice(at + 1)) };
  }

  function route() {
    if (current) current.abort();
    current = new AbortController();
    const signal = current.signal;
    const signedIn = Boolean(storedKey());
    keyView.hidden = signedIn;
    nav.hidden = !signedIn;
    forgetButton.hidden = !signedIn;
    view.replaceChildren();
    if (!signedIn) {
      keyInput.focus();
      return;
    }
    const { path, params } = parseHash();
    const match = path.match(/^\/tasks\/([^/]+)$/);
    const admin = isAdmin();
    const section = admin ? "keys" : path === "/new" ? "new" : match ? "task" : "tasks";
    for (const link of nav.querySelectorAll("a")) {
      link.hidden = (link.dataset.nav === "keys") !== admin;
      link.classList.toggle("active", link.dataset.nav === section || (section === "task" && link.dataset.nav === "tasks"));
    }
    const run = admin
      ? keysView(signal)
      : section === "new"
        ? newTaskView(signal)
        : match
          ? taskView(decodeURIComponent(match[1]), signal)
          : listView(params, signal);
    run.catch((failure) => {
      if (signal.aborted || failure.name === "AbortError") return;
      view.replaceChildren(
        el("div", { class: "panel notice error" }, el("strong", { text: "Something went wrong. " }), failure.message),
      );
    });
  }

  window.addEventListener("hashchange", route);

  // -- list view --------------------------------------------------------------------------------

  async function listView(params, signal) {
    const status = params.get("status") || "";
    const provider = params.get("provider") || "";
    const offered = await providers(signal);

    const setFilter = (name, value) => {
      const next = new URLSearchParams(params);
      if (value) next.set(name, value);
      else next.delete(name);
      const query = next.toString();
      location.hash = query ? `#/?${query}` : "#/";
    };
    const statusSelect = el(
      "select",
      { id: "filter-status", onchange: (e) => setFilter("status", e.target.value) },
      el("option", { value: "", text: "any status" }),
      STATUSES.map((s) => el("option", { value: s, text: s, selected: s === status })),
    );
    const providerNames = offered.map((p) => p.name);
    if (provider && !providerNames.includes(provider)) providerNames.push(provider);
    const providerSelect = el(
      "select",
      { id: "filter-provider", onchange: (e) => setFilter("provider", e.target.value) },
      el("option", { value: "", text: "any provider" }),
      providerNames.map((name) => el("option", { value: name, text: name, selected: name === provider })),
    );

    const body = el("tbody");
    const table = el(
      "table",
      { class: "tasks" },
      el(
        "thead",
        {},
        el("tr", {}, ["", "Status", "Prompt", "Provider · model", "Created"].map((h) => el("th", { scope: "col", text: h }))),
      ),
      body,
    );
    const more = el("button", { type: "button", class: "secondary", id: "load-more", hidden: true, text: "Load more" });
    // This tenant's spend this month (UTC), beside the list; the list does not wait for it.
    const spend = el("span", { id: "usage-panel", class: "muted small" });
    api("v1/usage", { signal })
      .then((usage) => {
        spend.textContent = `This month: ${usage.tasks} ${usage.tasks === 1 ? "task" : "tasks"}, ${money(usage.usd)}`;
      })
      .catch(() => {});
    const empty = el("div", { class: "empty", hidden: true });
    view.replaceChildren(
      el(
        "div",
        { class: "toolbar" },
        el("h1", { text: "Tasks" }),
        spend,
        el("span", { class: "spacer" }),
        el("label", { class: "inline" }, "Status ", statusSelect),
        el("label", { class: "inline" }, "Provider ", providerSelect),
        el("a", { class: "button primary", href: "#/new", text: "New task" }),
      ),
      el("div", { class: "panel flush" }, table, empty),
      el("div", { class: "more" }, more),
    );

    const rows = new Map(); // task id -> {task, row}
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (status) query.set("status", status);
    if (provider) query.set("provider", provider);

    const loadPage = async (cursor) => {
      if (cursor) query.set("cursor", cursor);
      const page = await api(`v1/tasks?${query}`, { signal });
      for (const task of page.items) {
        const row = taskRow(task);
        rows.set(task.id, { task, row });
        body.append(row);
      }
      more.hidden = !page.next_cursor;
      more.onclick = async () => {
        more.disabled = true;
        try {
          await loadPage(page.next_cursor);
        } finally {
          more.disabled = false;
        }
      };
      if (rows.size === 0) {
        table.hidden = true;
        empty.hidden = false;
        empty.replaceChildren(
          status || provider
            ? el("p", { text: "No tasks match these filters." })
            : el(
                "p",
                {},
                "No tasks yet. ",
                el("a", { href: "#/new", text: "Submit one" }),
                " — the sandbox provider needs no key and answers within seconds.",
              ),
        );
      }
    };
    await loadPage(null);
    await followRunning(rows, signal);
  }

  function money(usd) {
    return usd === null || usd === undefined ? "—" : `$${Number(usd).toFixed(4)}`;
  }

  // -- keys (the admin key only) ----------------------------------------------------------------

  async function keysView(signal) {
    const [{ keys }, usage] = await Promise.all([
      api("v1/admin/keys", { signal }),
      api("v1/admin/usage?group_by=tenant", { signal }),
    ]);
    const secretBox = el("div", { id: "new-secret", class: "panel notice", hidden: true });
    const formError = el("p", { id: "key-form-error", class: "form-error", role: "alert", hidden: true });
    const input = (id, attrs) => el("input", { id, name: id, ...attrs });
    const tenant = input("key-tenant", { required: true, placeholder: "acme", pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" });
    const name = input("key-name", { placeholder: "what it is for" });
    const budget = input("key-budget", { type: "number", min: "0", step: "any", placeholder: "none" });
    const period = el(
      "select",
      { id: "key-period" },
      el("option", { value: "month", text: "a month" }),
      el("option", { value: "day", text: "a day" }),
      el("option", { value: "", text: "its lifetime" }),
    );
    const rate = input("key-rate", { type: "number", min: "1", step: "1", placeholder: "no limit" });
    const label = (control, text) => el("label", { class: "inline" }, `${text} `, control);
    const form = el(
      "form",
      { id: "create-key-form", class: "panel", autocomplete: "off" },
      el("h2", { text: "New key" }),
      label(tenant, "Tenant"),
      label(name, "Name"),
      label(budget, "Budget (USD)"),
      label(period, "per"),
      label(rate, "Creates a minute"),
      formError,
      el("button", { type: "submit", class: "primary", id: "create-key", text: "Create key" }),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      formError.hidden = true;
      const body = { tenant: tenant.value.trim(), name: name.value.trim() };
      if (budget.value !== "") body.budget_usd = Number(budget.value);
      body.budget_period = period.value || null;
      if (rate.value !== "") body.rate_per_minute = Number(rate.value);
      try {
        const created = await api("v1/admin/keys", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
        await keysView(signal);
        const box = document.getElementById("new-secret");
        box.hidden = false;
        box.replaceChildren(
          el("strong", { text: `The key for ${created.tenant}, shown this once: ` }),
          el("code", { id: "new-secret-value", text: created.key }),
          el("p", { class: "muted small", text: "Copy it now: only its hash is kept, and it cannot be shown again." }),
        );
      } catch (failure) {
        const named = Object.entries(failure.fields || {}).map(([field, problem]) => `${field}: ${problem}`);
        formError.textContent = named.length ? named.join("; ") : failure.message;
        formError.hidden = false;
      }
    });

    const rows = keys.map((key) =>
      el(
        "tr",
        { "data-key-id": key.id },
        el("td", {}, el("code", { text: key.id })),
        el("td", { text: key.tenant }),
        el("td", { text: key.name }),
        el("td", { text: key.budget_usd === null ? "none" : `${money(key.budget_usd)} / ${key.budget_period || "lifetime"}` }),
        el("td", { text: key.rate_per_minute === null ? "no limit" : `${key.rate_per_minute} / min` }),
        el("td", { class: "state", text: key.disabled ? "disabled" : "active" }),
        el(
          "td",
          {},
          el("button", {
            type: "button",
            class: "secondary revoke",
            text: "Revoke",
            onclick: async () => {
              if (!window.confirm(`Revoke ${key.id} (${key.tenant})? Apps using it are refused at once.`)) return;
              await api(`v1/admin/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
              await keysView(signal);
            },
          }),
        ),
      ),
    );
    const header = (...names) => el("thead", {}, el("tr", {}, names.map((h) => el("th", { scope: "col", text: h }))));
    const keysTable = keys.length
      ? el("table", { class: "tasks", id: "keys-table" }, header("Id", "Tenant", "Name", "Budget", "Rate", "State", ""), el("tbody", {}, rows))
      : el("p", { class: "empty", text: "No keys in the database yet: the keys of RECEIVER_API_KEYS work as before." });
    const spendRows = usage.groups.map((group) =>
      el("tr", {}, el("td", { text: group.group }), el("td", { text: String(group.tasks) }), el("td", { text: money(group.usd) })),
    );
    view.replaceChildren(
      el("div", { class: "toolbar" }, el("h1", { text: "Keys" })),
      secretBox,
      el("div", { class: "panel flush" }, keysTable),
      form,
      el("h2", { text: "Spend this month, by tenant" }),
      el(
        "div",
        { class: "panel flush" },
        el("table", { class: "tasks", id: "spend-table" }, header("Tenant", "Tasks", "USD"), el("tbody", {}, spendRows)),
      ),
    );
  }

  function taskRow(task) {
    const link = `#/tasks/${encodeURIComponent(task.id)}`;
    const image = task.images && task.images[0];
    const thumb = image && image.expired
      ? el("span", { class: "thumb placeholder expired", title: "expired", text: "expired" })
      : image
      ? el("img", {
          class: "thumb",
          src: image.url,
          alt: `image of task ${task.id}`,
          loading: "lazy",
          width: 64,
          height: 64,
        })
      : el("span", { class: "thumb placeholder", "aria-hidden": "true" });
    return el(
      "tr",
      { "data-task-id": task.id },
      el("td", { class: "thumb-cell" }, el("a", { href: link, tabindex: "-1" }, thumb)),
      el("td", {}, statusBadge(task.status)),
      el(
        "td",
        { class: "prompt-cell" },
        el("a", { href: link, class: "prompt", text: task.prompt }),
        task.error ? el("div", { class: "error-line", text: `${task.error.code}: ${task.error.message}` }) : null,
      ),
      el("td", {}, el("div", { text: task.provider }), el("div", { class: "muted small", text: task.model })),
      el("td", { class: "nowrap" }, timeNode(task.created_at)),
    );
  }

  // Unfinished tasks in the list are followed by long-polling them one at a time, in turn: each
  // request waits until that task ends or WAIT_SECONDS pass, so nothing polls on a short timer.
  async function followRunning(rows, signal) {
    let turn = 0;
    for (;;) {
      const unfinished = [...rows.values()].filter((entry) => !TERMINAL.has(entry.task.status));
      if (unfinished.length === 0 || signal.aborted) return;
      const entry = unfinished[turn++ % unfinished.length];
      const task = await longPoll(entry.task.id, signal);
      const row = taskRow(task);
      entry.row.replaceWith(row);
      entry.row = row;
      entry.task = task;
    }
  }

  // One long-poll, retried with a growing pause when the network fails (not when the task runs on).
  async function longPoll(id, signal) {
    let pause = 1000;
    for (;;) {
      try {
        return await api(`v1/tasks/${encodeURIComponent(id)}?wait=${WAIT_SECONDS}`, { signal });
      } catch (failure) {
        if (signal.aborted || failure instanceof ApiFailure) throw failure;
        await sleep(pause, signal);
        pause = Math.min(pause * 2, 30000);
      }
    }
  }

  // -- task view --------------------------------------------------------------------------------

  async function taskView(id, signal) {
    const header = el("div", { class: "toolbar" });
    const images = el("section", { id: "task-images", class: "images" });
    const problem = el("section", { id: "task-error" });
    const details = el("section", { class: "panel", id: "task-details" });
    const timeline = el("section", { class: "panel", id: "task-events" });
    view.replaceChildren(
      el("p", { class: "back" }, el("a", { href: "#/", text: "← All tasks" })),
      header,
      problem,
      images,
      el("div", { class: "columns" }, details, timeline),
    );
    let shownImages = "";
    let refused = null; // what the service said to the last cancel or delete, shown until the next one
    const act = async (button, question, confirmLabel, path, method, done) => {
      if (!(await confirmed(question, confirmLabel))) return;
      button.disabled = true;
      try {
        const answer = await api(path, { method, signal });
        refused = null;
        done(answer);
      } catch (failure) {
        if (signal.aborted || !(failure instanceof ApiFailure)) throw failure;
        refused = failure;
        button.disabled = false;
        problem.replaceChildren(errorBox({ code: failure.code, message: failure.message }));
      }
    };
    const actions = (task) => {
      const path = `v1/tasks/${encodeURIComponent(task.id)}`;
      if (!TERMINAL.has(task.status)) {
        const button = el("button", {
          id: "cancel-task",
          type: "button",
          text: "Cancel task",
          onclick: () =>
            act(button, "Cancel this task? It will not be submitted or finished, and no images will be kept.", "Cancel task", `${path}/cancel`, "POST", (cancelled) => show(cancelled, lastEvents)),
        });
        return button;
      }
      const button = el("button", {
        id: "delete-task",
        type: "button",
        class: "danger",
        text: "Delete task",
        onclick: () =>
          act(button, "Delete this task with its images and events? This cannot be undone.", "Delete task", path, "DELETE", () => {
            location.hash = "#/";
          }),
      });
      return button;
    };
    let lastEvents = [];
    const show = (task, events) => {
      lastEvents = events;
      header.replaceChildren(el("h1", { class: "task-title", text: task.id }), statusBadge(task.status, "task-status"));
      if (!TERMINAL.has(task.status)) {
        header.append(el("span", { class: "muted small", text: "Waiting for the provider; this page updates by itself." }));
      }
      header.append(el("span", { class: "spacer" }), actions(task));
      problem.replaceChildren(task.error ? errorBox(task.error) : refused ? errorBox({ code: refused.code, message: refused.message }) : "");
      // Signed links change on every answer; redraw the pictures only when the images themselves change.
      const imageKey = task.images.map((image) => image.sha256 + (image.expired ? ":expired" : "")).join(",");
      if (imageKey !== shownImages || !images.firstChild) {
        shownImages = imageKey;
        images.replaceChildren(...imageFigures(task));
      }
      details.replaceChildren(...detailsList(task));
      timeline.replaceChildren(...eventList(events));
    };

    let [task, events] = await Promise.all([
      api(`v1/tasks/${encodeURIComponent(id)}`, { signal }),
      api(`v1/tasks/${encodeURIComponent(id)}/events?limit=500`, { signal }),
    ]);
    show(task, events.items);
    while (!TERMINAL.has(task.status)) {
      task = await longPoll(id, signal);
      try {
        events = await api(`v1/tasks/${encodeURIComponent(id)}/events?limit=500`, { signal });
      } catch (failure) {
        if (signal.aborted || failure instanceof ApiFailure) throw failure; // else: keep the last timeline
      }
      show(task, events.items);
    }
  }

  // A modal question with two buttons; resolves true only when the confirming one is pressed.
  function confirmed(question, confirmLabel) {
    return new Promise((resolve) => {
      const keep = el("button", { type: "button", id: "confirm-no", text: "Keep it" });
      const yes = el("button", { type: "button", id: "confirm-yes", class: "danger", text: confirmLabel });
      const dialog = el(
        "dialog",
        { id: "confirm-dialog", class: "panel" },
        el("p", { text: question }),
        el("div", { class: "toolbar" }, keep, yes),
      );
      let answer = false;
      keep.addEventListener("click", () => dialog.close());
      yes.addEventListener("click", () => {
        answer = true;
        dialog.close();
      });
      dialog.addEventListener("close", () => {
        dialog.remove();
        resolve(answer);
      });
      document.body.append(dialog);
      dialog.showModal();
      keep.focus();
    });
  }

  function errorBox(error) {
    return el(
      "div",
      { class: "panel notice error" },
      el("div", {}, el("strong", { text: error.code }), error.provider_code ? el("span", { class: "muted", text: ` (provider code ${error.provider_code})` }) : null),
      el("p", { class: "message", text: error.message }),
    );
  }

  function imageFigures(task) {
    if (task.images.length === 0) {
      const text = TERMINAL.has(task.status) ? "This task has no images." : "The images appear here when the task succeeds.";
      return [el("div", { class: "panel empty", text })];
    }
    return task.images.map((image) => {
      const kind = (image.content_type || "").replace(/^image\//, "").toUpperCase();
      const dimensions = image.width && image.height ? `${image.width} × ${image.height}` : "size unknown";
      // An expired image's bytes are gone (RECEIVER_RETAIN_IMAGES): a labelled placeholder, not a broken picture.
      const picture = image.expired
        ? el("div", { class: "expired-image", role: "img", "aria-label": `image ${image.index} of task ${task.id}, expired`, text: "Expired: this image was deleted after its retention period." })
        : el(
          "a",
          { href: image.url, target: "_blank", rel: "noopener noreferrer" },
          el("img", {
            src: image.url,
            alt: `image ${image.index} of task ${task.id}`,
            width: image.width || null,
            height: image.height || null,
          }),
        );
      return el(
        "figure",
        { class: image.expired ? "panel image expired" : "panel image" },
        picture,
        el(
          "figcaption",
          {},
          el("strong", { text: `#${image.index}` }),
          ` ${dimensions} · ${kind} · ${formatBytes(image.size)}`,
          el("div", { class: "muted small mono", title: "sha256", text: image.sha256 }),
          isHttpUrl(image.source_url)
            ? el("div", { class: "small" }, el("a", { href: image.source_url, rel: "noopener noreferrer", target: "_blank", text: "provider's link" }), el("span", { class: "muted", text: " (expires at the provider)" }))
            : null,
        ),
      );
    });
  }

  function detailsList(task) {
    const row = (term, ...value) => [el("dt", { text: term }), el("dd", {}, ...value)];
    const metadata = task.metadata && Object.keys(task.metadata).length ? JSON.stringify(task.metadata, null, 2) : null;
    return [
      el("h2", { text: "Details" }),
      el(
        "dl",
        { class: "details" },
        row("Prompt", el("span", { class: "prose", id: "task-prompt", text: task.prompt })),
        row("Provider", task.provider),
        row("Model", el("span", { class: "mono", text: task.model })),
        row("Provider task", task.provider_task_id ? el("span", { class: "mono", text: task.provider_task_id }) : el("span", { class: "muted", text: "none" })),
        (task.attempts || []).length ? row("Tried before", attemptList(task.attempts)) : [],
        (task.fallback || []).length ? row("Fallback", el("span", { id: "task-fallback", text: task.fallback.join(" → ") })) : [],
        row("Created", timeNode(task.created_at)),
        row("Updated", timeNode(task.updated_at)),
        row("Completed", timeNode(task.completed_at), task.completed_at ? el("span", { class: "muted", text: ` after ${seconds(task.created_at, task.completed_at)}` }) : null),
        metadata ? row("Metadata", el("pre", { text: metadata })) : [],
      ),
    ];
  }

  // Each provider the task moved away from (fallback), in order, with the error that made it move.
  function attemptList(attempts) {
    return el(
      "ol",
      { class: "attempts", id: "task-attempts" },
      attempts.map((attempt) =>
        el(
          "li",
          {},
          el("span", { class: "mono", text: `${attempt.provider} · ${attempt.model}` }),
          el("span", { class: "muted", text: ` — ${attempt.error.code}: ${attempt.error.message}` }),
          el("span", { class: "muted small", text: " " }),
          timeNode(attempt.at),
        ),
      ),
    );
  }

  function eventList(events) {
    if (events.length === 0) return [el("h2", { text: "Timeline" }), el("p", { class: "muted", text: "No events yet." })];
    return [
      el("h2", { text: "Timeline" }),
      el(
        "ol",
        { class: "timeline" },
        events.map((event) =>
          el(
            "li",
            { class: event.verified ? "verified" : "unverified" },
            el(
              "div",
              { class: "event-head" },
              el("span", { class: "kind", text: event.kind }),
              el("span", { class: event.verified ? "tag ok" : "tag", text: event.verified ? "verified" : "not verified" }),
              event.change ? el("span", { class: "tag change", text: event.change }) : null,
              el("span", { class: "spacer" }),
              timeNode(event.at),
            ),
            event.summary ? el("div", { class: "summary", text: event.summary }) : null,
          ),
        ),
      ),
    ];
  }

  // -- new task ---------------------------------------------------------------------------------

  async function newTaskView(signal) {
    const offered = await providers(signal);
    const idempotencyKey = randomToken(); // a double submit of this form makes one task, not two
    const errorSlots = new Map();
    const field = (name, label, control, hint) => {
      const slot = el("div", { class: "field-error", hidden: true, role: "alert" });
      errorSlots.set(name, slot);
      return el("div", { class: "field", "data-field": name }, el("label", { for: control.id, text: label }), control, hint !== undefined ? el("div", { class: "hint muted small", text: hint }) : null, slot);
    };

    const providerSelect = el(
      "select",
      { id: "provider", name: "provider", required: true },
      offered.map((p) => el("option", { value: p.name, text: p.name, selected: p.name === "sandbox" })),
    );
    const prompt = el("textarea", { id: "prompt", name: "prompt", rows: 4, required: true, placeholder: "A lighthouse on a cliff at dawn, watercolor" });
    const modelList = el("datalist", { id: "model-options" });
    const model = el("input", { id: "model", name: "model", list: "model-options", spellcheck: "false", autocomplete: "off" });
    const aspect = el(
      "select",
      { id: "aspect-ratio", name: "aspect_ratio" },
      el("option", { value: "", text: "provider default" }),
      ASPECT_RATIOS.map((r) => el("option", { value: r, text: r })),
    );
    const seed = el("input", { id: "seed", name: "seed", type: "number", min: 0, step: 1, inputmode: "numeric", placeholder: "random" });
    const imageUrl = el("input", { id: "image-url", name: "image_url", type: "url", placeholder: "https://…", spellcheck: "false" });
    const imageFile = el("input", { id: "image-file", name: "image_file", type: "file", accept: "image/png,image/jpeg,image/webp" });

    const fields = {
      model: field("model", "Model", model),
      aspect_ratio: field("aspect_ratio", "Aspect ratio", aspect),
      seed: field("seed", "Seed", seed, "The same seed and prompt give the same picture, where the provider allows."),
      images: field(
        "images",
        "Input image",
        el("div", { class: "image-inputs" }, imageUrl, el("span", { class: "muted small", text: "or upload" }), imageFile),
        "",
      ),
    };
    const imageHint = fields.images.querySelector(".hint");
    const general = el("div", { class: "form-error", role: "alert", hidden: true });
    const submit = el("button", { type: "submit", class: "primary", id: "submit-task", text: "Generate" });
    const progress = el("span", { class: "muted small", id: "submit-progress" });

    const form = el(
      "form",
      { class: "panel task-form", id: "task-form", novalidate: true },
      field("provider", "Provider", providerSelect),
      field("prompt", "Prompt", prompt),
      el("div", { class: "row" }, fields.model, fields.aspect_ratio, fields.seed),
      fields.images,
      modelList,
      general,
      el("div", { class: "actions" }, submit, progress),
    );
    view.replaceChildren(el("div", { class: "toolbar" }, el("h1", { text: "New task" })), form);

    const chosen = () => offered.find((p) => p.name === providerSelect.value);
    // What the chosen model takes, from the same table the service checks requests against
    // (/v1/providers `takes`); a model it does not list falls back to the provider's fields.
    const modelTakes = (provider) => (provider.takes || {})[model.value.trim() || provider.default_model];
    const adaptModel = () => {
      const provider = chosen();
      if (!provider) return;
      const entry = modelTakes(provider);
      const takes = new Set(entry ? entry.fields : provider.fields);
      fields.aspect_ratio.hidden = !takes.has("aspect_ratio");
      fields.seed.hidden = !takes.has("seed");
      const ratios = entry && entry.aspect_ratios ? [...entry.aspect_ratios, ...entry.edit_aspect_ratios] : ASPECT_RATIOS;
      const kept = ratios.includes(aspect.value) ? aspect.value : "";
      aspect.replaceChildren(
        el("option", { value: "", text: "provider default" }),
        ...ratios.map((r) => el("option", { value: r, text: r, selected: r === kept })),
      );
      aspect.value = kept;
    };
    const adapt = () => {
      const provider = chosen();
      if (!provider) return;
      const takes = new Set(provider.fields);
      fields.model.hidden = !takes.has("model");
      fields.images.hidden = !takes.has("images") || provider.max_images < 1;
      modelList.replaceChildren(...provider.models.map((m) => el("option", { value: m })));
      model.value = provider.default_model;
      model.placeholder = provider.default_model;
      adaptModel();
      imageHint.textContent =
        provider.min_images > 0
          ? `${provider.name} needs an input image (a URL, or a file uploaded to this service).`
          : "Optional: a URL, or a file uploaded to this service, to edit instead of generating from scratch.";
    };
    providerSelect.addEventListener("change", adapt);
    model.addEventListener("input", adaptModel);
    adapt();
    prompt.focus();

    const showErrors = (message, fieldErrors) => {
      for (const slot of errorSlots.values()) slot.hidden = true;
      const leftover = [];
      for (const [name, text] of Object.entries(fieldErrors || {})) {
        const slot = errorSlots.get(name.replace(/\[\d+\]$/, ""));
        if (slot && !slot.parentElement.hidden) {
          slot.textContent = text;
          slot.hidden = false;
        } else {
          leftover.push(`${name}: ${text}`);
        }
      }
      general.replaceChildren(...(message ? [el("div", { text: message })] : []), ...leftover.map((line) => el("div", { text: line })));
      general.hidden = !message && leftover.length === 0;
    };

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const provider = chosen();
      const body = { provider: providerSelect.value, prompt: prompt.value };
      const local = {};
      if (!prompt.value.trim()) local.prompt = "write what the picture should show";
      if (!fields.model.hidden && model.value.trim() && model.value.trim() !== provider.default_model) body.model = model.value.trim();
      if (!fields.aspect_ratio.hidden && aspect.value) body.aspect_ratio = aspect.value;
      if (!fields.seed.hidden && seed.value !== "") {
        const value = Number(seed.value);
        if (!Number.isSafeInteger(value) || value < 0) local.seed = "a whole number from 0 to 9007199254740991";
        else body.seed = value;
      }
      const file = !fields.images.hidden && imageFile.files.length ? imageFile.files[0] : null;
      const url = !fields.images.hidden ? imageUrl.value.trim() : "";
      if (file && url) local.images = "give a URL or a file, not both";
      if (Object.keys(local).length) {
        showErrors("", local);
        return;
      }
      showErrors("", {});
      submit.disabled = true;
      try {
        if (file) {
          progress.textContent = "Uploading the image…";
          const upload = await api("v1/uploads", { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" }, signal });
          body.images = [upload.url];
        } else if (url) {
          body.images = [url];
        }
        progress.textContent = "Submitting…";
        const task = await api("v1/tasks", {
          method: "POST",
          body: JSON.stringify(body),
          headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
          signal,
        });
        location.hash = `#/tasks/${encodeURIComponent(task.id)}`;
      } catch (failure) {
        if (signal.aborted) return;
        progress.textContent = "";
        if (failure instanceof ApiFailure && failure.code === "idempotency_conflict") {
          showErrors("This form was already sent with other values; reload the page to send a new task.", {});
        } else if (failure instanceof ApiFailure) {
          showErrors(failure.message, failure.status === 413 || failure.status === 415 ? { images: failure.message } : failure.fields);
        } else {
          showErrors(`The service could not be reached: ${failure.message}`, {});
        }
      } finally {
        submit.disabled = false;
      }
    });
  }

  route();
})();
