// Refresh the page's main part in place; without this script a meta refresh does it.
(function () {
  "use strict";
  var every = parseInt(document.body.getAttribute("data-refresh-ms") || "0", 10);
  var main = document.getElementById("main");
  if (!every || !main) { return; }
  function refresh() {
    fetch("/?fragment=1", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 403) { window.location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null) { main.innerHTML = html; } })
      .catch(function () { /* the daemon restarts: try again later */ })
      .then(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
