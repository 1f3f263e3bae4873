// Progressive enhancement: the overview's live section follows the server's
// events. Without this script every page still works; the overview then
// refreshes itself every 10 s (a <noscript> meta refresh).
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  var source = new EventSource(live.getAttribute("data-events"));
  source.addEventListener("overview", function (e) {
    // Keep keyboard focus on the same link when the section is replaced.
    var active = document.activeElement;
    var href = active && live.contains(active) && active.getAttribute("href");
    live.innerHTML = e.data;
    live.removeAttribute("data-stale");
    if (href) {
      var links = live.querySelectorAll("a[href]");
      for (var i = 0; i < links.length; i++) {
        if (links[i].getAttribute("href") === href) { links[i].focus(); break; }
      }
    }
  });
  source.onerror = function () {
    // EventSource reconnects by itself; say the figures may be old meanwhile.
    live.setAttribute("data-stale", "true");
  };
})();
