// Progressive enhancement: the overview's live section follows the server's
// events. Without this script every page still works; the overview then
// refreshes itself every 10 s (a <noscript> meta refresh).
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  var source = new EventSource(live.getAttribute("data-events"));
  source.addEventListener("overview", function (e) {
    // Keep keyboard focus where it was when the section is replaced.
    var focused = document.activeElement && document.activeElement.id;
    live.innerHTML = e.data;
    live.removeAttribute("data-stale");
    if (focused) {
      var again = document.getElementById(focused);
      if (again) again.focus();
    }
  });
  source.onerror = function () {
    // EventSource reconnects by itself; say the figures may be old meanwhile.
    live.setAttribute("data-stale", "true");
  };
})();
