// minicloud web console: the VM page's interactive serial console. An
// element with data-console-src becomes an xterm.js terminal joined to the
// VM's console over a WebSocket (GET /vms/NAME/console/ws, bridged to
// AttachConsole with the user's token): binary messages carry output and
// keystrokes, text messages say how the session stands.
(function () {
  'use strict';

  function describe(c) {
    switch (c.type) {
      case 'attached':
        return c.writer ? 'Connected: typing reaches the guest.' :
          'Connected read-only: another session types into this console.';
      case 'notice':
        return c.message || (c.writerLost ? 'Read-only now: another session types.' : '');
      case 'closed':
        return 'The console closed: ' + (c.message || 'the VM stopped') + '.';
      case 'error':
        return c.message;
    }
    return '';
  }

  function start(el) {
    var status = document.getElementById('terminal-status');
    var term = new window.Terminal({
      cursorBlink: true, fontSize: 13, rows: 24, scrollback: 2000,
      theme: { background: '#111111', foreground: '#dddddd' },
    });
    var fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(el);
    fit.fit();
    window.addEventListener('resize', function () { fit.fit(); });

    var takeOver = document.getElementById('terminal-take-over');
    var enc = new TextEncoder();
    var ws = null;

    // connect opens the session; take asks for the write side even when
    // another session holds it (that one is told it lost it).
    function connect(take) {
      var scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
      var src = el.getAttribute('data-console-src') + (take ? '?take_over=1' : '');
      var sock = new WebSocket(scheme + '//' + window.location.host + src);
      sock.binaryType = 'arraybuffer';
      sock.onmessage = function (e) {
        if (typeof e.data === 'string') {
          var c = JSON.parse(e.data);
          // A notice (input dropped, the write side lost) says something
          // about the session but does not end it: the state stays
          // attached. (Setting it to "notice" made a read-only page that
          // was told at once look as if it never attached.)
          if (c.type !== 'notice') el.setAttribute('data-state', c.type);
          var writer = c.type === 'attached' ? !!c.writer : (c.type === 'notice' && c.writerLost ? false : null);
          if (writer !== null) {
            el.setAttribute('data-writer', writer ? 'true' : 'false');
            if (takeOver) takeOver.hidden = writer;
          }
          status.textContent = describe(c);
          return;
        }
        term.write(new Uint8Array(e.data));
      };
      sock.onclose = function () {
        if (sock !== ws) return;
        if (el.getAttribute('data-state') === 'attached') status.textContent = 'Disconnected.';
        el.setAttribute('data-state', 'closed');
      };
      ws = sock;
    }
    term.onData(function (d) {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(enc.encode(d));
    });
    if (takeOver) {
      takeOver.addEventListener('click', function () {
        var old = ws;
        term.reset(); // the new session replays the recent output
        connect(true);
        old.close();
      });
    }
    connect(false);
  }

  function init() {
    document.querySelectorAll('[data-console-src]').forEach(start);
  }
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', init);
  } else {
    init();
  }
})();
