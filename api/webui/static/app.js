// minicloud web console: live views. An element with data-live-src
// follows a server-sent event stream of rendered HTML (GET /vms/events):
// an "update" event carries an element that replaces the one with its id
// (or is appended, for a VM new to the list); "gone" names the id of a
// VM's element to remove; "reset" means the watch ended and the page is
// loaded again. No polling: the server pushes what WatchVMs reports.
(function () {
  'use strict';

  function follow(el) {
    var src = new EventSource(el.getAttribute('data-live-src'));
    src.addEventListener('update', function (e) {
      var t = document.createElement('template');
      t.innerHTML = e.data.trim();
      var node = t.content.firstElementChild;
      if (!node || !node.id) return;
      var old = document.getElementById(node.id);
      if (old) {
        old.replaceWith(node);
      } else if (el.tagName === 'TBODY') {
        el.appendChild(node);
      } else {
        return;
      }
      if (window.htmx) window.htmx.process(node);
    });
    src.addEventListener('gone', function (e) {
      var old = document.getElementById(e.data);
      if (old) old.remove();
      var href = el.getAttribute('data-gone-href');
      if (href) window.location.assign(href);
    });
    src.addEventListener('reset', function () {
      src.close();
      window.location.reload();
    });
  }

  function init() {
    document.querySelectorAll('[data-live-src]').forEach(follow);
  }
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', init);
  } else {
    init();
  }
})();
