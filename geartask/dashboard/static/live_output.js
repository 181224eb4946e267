// geartask dashboard: the Job page's live output (templates/_live_output.html, docs/dashboard.md).
// Polls /job/output while the page shows a running job and writes the worker's answer as text
// (textContent only: the output is whatever the command printed).
(function () {
  "use strict";
  var every = 1000;
  var last = null; // the last answer: fills a section the page's own refresh has just replaced

  function section() { return document.getElementById("live-output"); }

  function note(sec, text) {
    var n = sec && sec.querySelector(".live-note");
    if (n) n.textContent = text;
  }

  function render(sec, data) {
    var box = sec && sec.querySelector(".live-jobs");
    if (!box || !data) return;
    var jobs = Array.isArray(data.jobs) ? data.jobs : [];
    box.textContent = "";
    note(sec, jobs.length ? "" : "waiting for the worker to report the job");
    jobs.forEach(function (j) {
      var head = document.createElement("h3");
      var what = [String(j.host || j.worker || "?"), "(" + String(j.worker || "") + ")"];
      if (typeof j.bytes === "number") what.push(j.bytes + " bytes written");
      if (typeof j.dropped === "number" && j.dropped > 0) what.push(j.dropped + " bytes not streamed");
      if (j.cut) what.push("last 64 KiB shown");
      head.textContent = what.join(" · ");
      var pre = document.createElement("pre");
      pre.className = "result live-text";
      if (j.error) pre.textContent = "no answer from the worker: " + String(j.error);
      else if (!j.live) pre.textContent = "(not sent with --follow: the output shows here when the job ends)";
      else pre.textContent = String(j.output || "");
      box.appendChild(head);
      box.appendChild(pre);
      pre.scrollTop = pre.scrollHeight;
    });
    sec.setAttribute("data-rendered", "1");
  }

  function tick() {
    var sec = section();
    if (!sec) { setTimeout(tick, every); return; }
    var url = "/job/output?key=" + encodeURIComponent(sec.getAttribute("data-key") || "");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (data) { last = data; render(section(), data); })
      .catch(function () { note(section(), "the dashboard did not answer"); })
      .then(function () { setTimeout(tick, every); });
  }

  var live = document.getElementById("live");
  if (live && window.MutationObserver) {
    new MutationObserver(function () {
      var sec = section();
      if (sec && !sec.hasAttribute("data-rendered") && last) render(sec, last);
    }).observe(live, { childList: true });
  }
  tick();
})();
