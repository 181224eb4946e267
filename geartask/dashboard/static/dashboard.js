// geartask dashboard: fetch the page's live part again every refresh (no framework, no CDN).
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var every = (parseFloat(document.body.getAttribute("data-refresh")) || 2) * 1000;
  // Don't replace what the user is in the middle of: a ticked checkbox or a focused field.
  function busy() {
    var a = document.activeElement;
    return live.querySelector("input[type=checkbox]:checked") !== null ||
      (a && live.contains(a) && (a.tagName === "INPUT" || a.tagName === "SELECT"));
  }
  function tick() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (html) {
        if (!busy()) live.innerHTML = html;
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .then(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
