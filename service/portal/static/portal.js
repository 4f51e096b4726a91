/* FractureNode portal: a little plain JavaScript (no inline scripts: strict CSP). */
(function () {
  "use strict";

  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var CSRF = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); });
  }

  /* ---- masked patient data: reveal on click (the server writes an audit row) ---- */
  function initReveal() {
    $all("button.reveal").forEach(function (btn) {
      btn.addEventListener("click", function (ev) {
        ev.preventDefault();
        ev.stopPropagation();
        btn.disabled = true;
        fetch(btn.getAttribute("data-reveal-url"), {
          method: "POST", credentials: "same-origin",
          headers: { "X-CSRFToken": CSRF, "Accept": "application/json" }
        }).then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
          .then(function (data) {
            var box = btn.previousElementSibling;
            $('[data-field="patient_id"]', box).textContent = data.patient_id;
            $('[data-field="patient_name"]', box).textContent = data.patient_name;
            box.classList.remove("masked");
            box.classList.add("revealed");
            btn.hidden = true;
          })
          .catch(function () { btn.disabled = false; btn.textContent = "Retry"; });
      });
    });
  }

  /* ---- history: live status of studies still processing ---- */
  function setBadge(cell, status) {
    var badge = $('[data-role="status"]', cell);
    if (!badge) { return; }
    badge.className = "badge status-" + status;
    badge.textContent = "";
    if (status === "processing" || status === "received") {
      var sp = document.createElement("span");
      sp.className = "spinner";
      badge.appendChild(sp);
    }
    badge.appendChild(document.createTextNode(status));
  }

  function initHistoryPoller() {
    var table = document.getElementById("studies");
    if (!table) { return; }
    var url = table.getAttribute("data-status-url");
    function pending() {
      return $all("tr[data-study-id]", table).filter(function (tr) {
        var s = tr.getAttribute("data-status");
        return s === "processing" || s === "received";
      });
    }
    function tick() {
      var rows = pending();
      if (!rows.length) { return; }
      var ids = rows.map(function (tr) { return tr.getAttribute("data-study-id"); }).join(",");
      getJSON(url + "?ids=" + encodeURIComponent(ids)).then(function (data) {
        data.studies.forEach(function (st) {
          var tr = table.querySelector('tr[data-study-id="' + st.id + '"]');
          if (!tr) { return; }
          tr.setAttribute("data-status", st.status);
          setBadge(tr, st.status);
          var res = $('[data-role="result"]', tr);
          if (res) {
            res.className = st.result ? "badge call-" + st.result : "muted";
            res.textContent = st.result_label;
          }
          $('[data-role="probability"]', tr).textContent = st.probability_label;
          $('[data-role="top_type"]', tr).textContent = st.result === "no_fracture" ? "—" : st.top_type_label;
        });
      }).catch(function () { /* keep polling */ }).then(function () {
        if (pending().length) { window.setTimeout(tick, 3000); }
      });
    }
    if (pending().length) { window.setTimeout(tick, 2000); }
  }

  /* ---- study: reload when the analysis finishes ---- */
  function initStudyPoller() {
    var head = document.getElementById("study");
    if (!head) { return; }
    var status = head.getAttribute("data-status");
    if (status !== "processing" && status !== "received") { return; }
    var url = head.getAttribute("data-status-url");
    function tick() {
      getJSON(url).then(function (data) {
        if (data.status !== status) { window.location.reload(); return; }
        window.setTimeout(tick, 2500);
      }).catch(function () { window.setTimeout(tick, 5000); });
    }
    window.setTimeout(tick, 2000);
  }

  /* ---- image viewer: view switch, overlay opacity, zoom and pan ---- */
  function initViewer(root) {
    var stage = $("[data-stage]", root);
    var layers = $("[data-layers]", root);
    var slider = $("[data-opacity]", root);
    var level = $("[data-zoom-level]", root);
    var buttons = $all("[data-view]", root);
    var state = { view: "original", scale: 1, x: 0, y: 0 };
    var defaults = { edges: 85, heatmap: 50, hybrid: 100 };

    function apply() {
      layers.style.transform = "translate(" + state.x + "px," + state.y + "px) scale(" + state.scale + ")";
      level.textContent = Math.round(state.scale * 100) + "%";
    }
    function show(view) {
      state.view = view;
      buttons.forEach(function (b) {
        var on = b.getAttribute("data-view") === view;
        b.classList.toggle("active", on);
        b.setAttribute("aria-selected", on ? "true" : "false");
      });
      $all("[data-layer]", root).forEach(function (img) {
        img.hidden = img.getAttribute("data-layer") !== view;
        img.style.opacity = String(slider.value / 100);
      });
      slider.disabled = view === "original";
      slider.parentElement.classList.toggle("off", view === "original");
      root.setAttribute("data-current-view", view);
    }
    buttons.forEach(function (b) {
      b.addEventListener("click", function () {
        var view = b.getAttribute("data-view");
        if (view !== "original" && defaults[view] !== undefined) { slider.value = defaults[view]; }
        show(view);
      });
    });
    slider.addEventListener("input", function () {
      if (defaults[state.view] !== undefined) { defaults[state.view] = Number(slider.value); }
      $all("[data-layer]", root).forEach(function (img) { img.style.opacity = String(slider.value / 100); });
    });
    function zoomAt(factor, cx, cy) {
      var next = Math.min(8, Math.max(1, state.scale * factor));
      var k = next / state.scale;
      state.x = cx - k * (cx - state.x);
      state.y = cy - k * (cy - state.y);
      state.scale = next;
      if (next === 1) { state.x = 0; state.y = 0; }
      apply();
    }
    $all("[data-zoom]", root).forEach(function (b) {
      b.addEventListener("click", function () {
        var what = b.getAttribute("data-zoom");
        var cx = stage.clientWidth / 2, cy = stage.clientHeight / 2;
        if (what === "in") { zoomAt(1.5, cx, cy); }
        else if (what === "out") { zoomAt(1 / 1.5, cx, cy); }
        else { state.scale = 1; state.x = 0; state.y = 0; apply(); }
      });
    });
    stage.addEventListener("wheel", function (ev) {
      ev.preventDefault();
      var rect = stage.getBoundingClientRect();
      zoomAt(ev.deltaY < 0 ? 1.2 : 1 / 1.2, ev.clientX - rect.left, ev.clientY - rect.top);
    }, { passive: false });
    var drag = null;
    stage.addEventListener("pointerdown", function (ev) {
      if (state.scale === 1) { return; }
      drag = { x: ev.clientX - state.x, y: ev.clientY - state.y };
      stage.classList.add("dragging");
      stage.setPointerCapture(ev.pointerId);
    });
    stage.addEventListener("pointermove", function (ev) {
      if (!drag) { return; }
      state.x = ev.clientX - drag.x;
      state.y = ev.clientY - drag.y;
      apply();
    });
    function endDrag() { drag = null; stage.classList.remove("dragging"); }
    stage.addEventListener("pointerup", endDrag);
    stage.addEventListener("pointercancel", endDrag);
    show("original");
    apply();
  }

  /* ---- upload: drag and drop, one request per file with progress ---- */
  function initUpload() {
    var zone = document.getElementById("dropzone");
    if (!zone) { return; }
    var input = document.getElementById("files");
    var list = document.getElementById("upload-list");
    var url = zone.getAttribute("data-upload-url");
    var maxBytes = Number(zone.getAttribute("data-max-mb")) * 1024 * 1024;
    var meta = document.getElementById("upload-meta");

    function item(file) {
      var li = document.createElement("li");
      li.className = "upload-item";
      li.setAttribute("data-testid", "upload-item");
      var name = document.createElement("span"); name.className = "name"; name.textContent = file.name;
      var st = document.createElement("span"); st.className = "state muted"; st.textContent = "waiting";
      var bar = document.createElement("progress"); bar.max = 100; bar.value = 0;
      var msg = document.createElement("div"); msg.className = "msg";
      li.appendChild(name); li.appendChild(st); li.appendChild(bar); li.appendChild(msg);
      list.appendChild(li);
      return { li: li, state: st, bar: bar, msg: msg };
    }
    function fail(ui, text) {
      ui.li.classList.add("error");
      ui.li.setAttribute("data-outcome", "error");
      ui.state.textContent = "rejected";
      ui.bar.hidden = true;
      ui.msg.textContent = text;
    }
    function follow(ui, data) {
      var link = document.createElement("a");
      link.href = data.study_url;
      link.textContent = "Open study " + data.study_id;
      ui.msg.textContent = data.duplicate ? "Already received. " : "Stored; waiting for analysis. ";
      ui.msg.appendChild(link);
      var statusUrl = data.study_url + "/status";
      function tick() {
        getJSON(statusUrl).then(function (st) {
          var img = st.images.filter(function (i) { return i.id === data.instance_id; })[0] || {};
          var s = img.status || st.status;
          if (s === "done") {
            ui.state.textContent = st.result_label;
            ui.li.classList.add("done");
            ui.li.setAttribute("data-outcome", "done");
          } else if (s === "rejected" || s === "failed") {
            ui.li.classList.add("rejected");
            ui.li.setAttribute("data-outcome", s);
            ui.state.textContent = s === "rejected" ? "not analysed" : "failed";
            ui.msg.textContent = (img.reason || "") + " ";
            ui.msg.appendChild(link);
          } else {
            ui.state.textContent = s + "…";
            window.setTimeout(tick, 2000);
          }
        }).catch(function () { window.setTimeout(tick, 4000); });
      }
      tick();
    }
    function send(file) {
      var ui = item(file);
      if (file.size > maxBytes) {
        fail(ui, "Too large: " + (file.size / 1048576).toFixed(1) + " MB (the limit is " + (maxBytes / 1048576) + " MB).");
        return;
      }
      var fd = new FormData();
      fd.append("file", file, file.name);
      fd.append("csrf_token", CSRF);
      if (meta) {
        fd.append("patient_id", meta.elements.patient_id.value);
        fd.append("patient_name", meta.elements.patient_name.value);
      }
      var xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("X-CSRFToken", CSRF);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", function (ev) {
        if (ev.lengthComputable) {
          ui.bar.value = Math.round(ev.loaded / ev.total * 100);
          ui.state.textContent = ui.bar.value + "%";
        }
      });
      xhr.addEventListener("load", function () {
        var data = null;
        try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
        if (xhr.status >= 200 && xhr.status < 300 && data && data.ok) {
          ui.bar.value = 100;
          ui.state.textContent = "uploaded";
          ui.li.setAttribute("data-study-id", data.study_id);
          follow(ui, data);
        } else {
          // {ok, error: "..."} from the upload view; {error: {code, message}} (service.errors) for a request
          // refused before the view, e.g. a disk that fills while the file is received (CSRF parses the form)
          var why = data && (data.error && typeof data.error === "object" ? data.error.message
                             : (data.error || (data.error === undefined && data.message)));
          if (!why && xhr.status === 413) { why = "too large"; }
          if (!why && xhr.status === 400) { why = "the request was refused (session expired? reload the page)"; }
          fail(ui, "Rejected: " + (why || ("HTTP " + xhr.status)));
        }
      });
      xhr.addEventListener("error", function () { fail(ui, "Network error; the file was not sent."); });
      xhr.send(fd);
    }
    function handle(files) { Array.prototype.forEach.call(files, send); }
    zone.addEventListener("click", function (ev) { if (ev.target.tagName !== "LABEL" && ev.target !== input) { input.click(); } });
    zone.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); } });
    input.addEventListener("change", function () { handle(input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach(function (t) {
      zone.addEventListener(t, function (ev) { ev.preventDefault(); zone.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (t) {
      zone.addEventListener(t, function (ev) { ev.preventDefault(); zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (ev) { if (ev.dataTransfer) { handle(ev.dataTransfer.files); } });
  }

  function init() {
    initReveal();
    initHistoryPoller();
    initStudyPoller();
    $all("[data-viewer]").forEach(initViewer);
    initUpload();
    $all("[data-print]").forEach(function (b) { b.addEventListener("click", function () { window.print(); }); });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
})();
