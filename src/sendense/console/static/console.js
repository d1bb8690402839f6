// Sendense console: the few behaviours plain HTML lacks. Loaded as a file
// (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  document.addEventListener("click", function (event) {
    var el = event.target.closest("[data-copy], [data-back]");
    if (!el) { return; }
    if (el.hasAttribute("data-back") && window.history.length > 1) {
      event.preventDefault();
      window.history.back();
    } else if (el.hasAttribute("data-copy")) {
      var text = document.getElementById(el.getAttribute("data-copy")).textContent;
      if (navigator.clipboard) { navigator.clipboard.writeText(text); }
      el.textContent = "Copied";
    }
  });
})();
