// Milepost console: the pages work without this. It does two things only:
// 1. asks for the page in the browser's time zone (?tz=) when the link had none;
// 2. every 10 s, refreshes the parts marked data-live (from the same page, fetched
//    again) and the charts marked data-live-img.
(function () {
  "use strict";
  var url = new URL(window.location.href);
  if (!url.searchParams.has("tz")) {
    try {
      var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
      if (zone && zone !== "UTC" && zone !== "Etc/UTC") {
        url.searchParams.set("tz", zone);
        window.location.replace(url.toString());
        return;
      }
    } catch (e) { /* no Intl: UTC it is */ }
  }
  function refresh() {
    if (document.hidden) return;
    fetch(window.location.href, { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (!text) return;
        var fresh = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (el) {
          var now = fresh.getElementById(el.id);
          if (now) el.innerHTML = now.innerHTML;
        });
        // A relative range ("last day") has moved on: take the charts' new links.
        document.querySelectorAll("img[data-live-img][id]").forEach(function (img) {
          var now = fresh.getElementById(img.id);
          if (now && now.getAttribute("src") !== img.getAttribute("src")) {
            img.setAttribute("src", now.getAttribute("src"));
          }
        });
      })
      .catch(function () { /* offline for a moment: try again next time */ });
  }
  window.setInterval(refresh, 10000);
})();
