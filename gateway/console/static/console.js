// The Retort console's own script (no build step): the CSRF header for htmx requests and
// the rating page's keyboard shortcuts.
(function () {
  "use strict";

  document.addEventListener("htmx:configRequest", function (event) {
    var field = document.querySelector("input[name=csrf_token]");
    if (field && field.value) {
      event.detail.headers["X-CSRF-Token"] = field.value;
    }
  });

  // After a partial update (adapter actions), move keyboard focus to its outcome, so that a
  // keyboard or screen-reader user hears what happened and continues from there.
  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail.target;
    if (!target || target.id !== "adapter-panel") return;
    var outcome = target.querySelector("[role=alert], [role=status]");
    if (outcome) {
      outcome.setAttribute("tabindex", "-1");
      outcome.focus();
    }
  });

  function typing(target) {
    if (!target || !target.tagName) return false;
    var tag = target.tagName.toLowerCase();
    return tag === "textarea" || tag === "select" || (tag === "input" && target.type !== "hidden"
      && target.type !== "checkbox" && target.type !== "radio") || target.isContentEditable;
  }

  function click(id) {
    var el = document.getElementById(id);
    if (el) {
      el.click();
      return true;
    }
    return false;
  }

  document.addEventListener("keydown", function (event) {
    var form = document.getElementById("rate-form");
    if (!form) return;
    if (event.key === "Escape" && typing(event.target)) {
      event.target.blur();
      return;
    }
    if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
    var handled = false;
    if (event.key === "u" || event.key === "+") {
      handled = click("rate-up");
    } else if (event.key === "d" || event.key === "-") {
      handled = click("rate-down");
    } else if (event.key >= "1" && event.key <= "5") {
      document.getElementById("score").value = String((Number(event.key) - 1) / 4);
      handled = click("rate-score");
    } else if (event.key === "c") {
      document.getElementById("correction").focus();
      handled = true;
    } else if (event.key === "n") {
      var next = document.getElementById("next-unrated");
      if (next) {
        window.location.assign(next.href);
        handled = true;
      }
    }
    if (handled) event.preventDefault();
  });
})();
