// Browser test of the minicloud web console, run by TestBrowser
// (api/webui/browser_test.go) against a real all-in-one cloud: Playwright
// drives Debian's chromium, headless. It signs in with a token, shows that
// a bad VM name gets the API's message next to the field, creates a VM from
// the form and watches its row go PENDING -> RUNNING with no reload, reads
// its serial console on its page, deletes it, and saves a screenshot of
// every page. Exits non-zero, with the reason, on any failure.
//
// Environment (set by the Go test):
//   MC_URL            the console's base URL
//   MC_TOKEN          a user token
//   MC_VM             the name of the VM to create
//   MC_BAD_NAME       a name the API refuses, MC_BAD_NAME_ERROR its message
//   MC_CONSOLE_EXPECT text the VM's console log shows once it booted
//   MC_SHOTS          directory for the screenshots
//   CHROMIUM          the browser (default /usr/bin/chromium)
'use strict';

const path = require('path');
const { chromium } = require('playwright-core');

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

const base = env('MC_URL');
const shots = env('MC_SHOTS');
const vmName = env('MC_VM');
const bootTimeout = Number(process.env.MC_BOOT_TIMEOUT_MS) || 10 * 60 * 1000; // a TCG guest on a busy 2-core machine

function log(...args) {
  console.log(new Date().toISOString(), ...args);
}

// Chromium aborts a navigation with ERR_NETWORK_CHANGED when the host's
// links change, and the agent adds and removes taps and bridges as VMs
// come and go: such a navigation is tried again.
function networkChanged(e) {
  const m = String(e && e.message);
  return m.includes('ERR_NETWORK_CHANGED') || m.includes('chrome-error://');
}

async function open(page, url) {
  for (let i = 0; ; i++) {
    try {
      return await page.goto(url);
    } catch (e) {
      if (!networkChanged(e) || i >= 5) throw e;
      log('navigation to', url, 'cut by a host network change; again');
      await page.waitForTimeout(1000);
    }
  }
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(shots, name + '.png'), fullPage: true });
  log('screenshot', name);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Root in a container has no user namespaces for the sandbox.
    args: ['--no-sandbox'],
  });
  try {
    // The console's certificate is the cloud's own CA's, which the
    // browser does not know.
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    const problems = [];
    page.on('console', (m) => {
      // A load cut by a host network change (above) is not the page's fault.
      if (m.type() === 'error' && !m.text().includes('ERR_NETWORK_CHANGED')) problems.push('console: ' + m.text());
    });
    page.on('pageerror', (e) => problems.push('page error: ' + e.message));
    page.on('response', (r) => { if (r.status() >= 400) problems.push(`${r.status()} for ${r.request().method()} ${r.url()}`); });

    // Sign in.
    await open(page, base + '/');
    await page.waitForURL(/\/login$/);
    await shot(page, 'login');
    await page.fill('input[name=token]', env('MC_TOKEN'));
    await page.click('button[type=submit]');
    await page.waitForSelector('h1:text("Overview")');

    // A bad name: the API's message next to the name field, what was
    // typed kept.
    await open(page, base + '/vms');
    await page.fill('#create-vm input[name=name]', env('MC_BAD_NAME'));
    await page.click('#create-vm button[type=submit]');
    const err = page.locator('#create-vm #err-name');
    await err.waitFor();
    const got = (await err.textContent()).trim();
    if (got !== env('MC_BAD_NAME_ERROR')) {
      throw new Error(`bad name: the page says ${JSON.stringify(got)}, the API ${JSON.stringify(env('MC_BAD_NAME_ERROR'))}`);
    }
    if ((await page.inputValue('#create-vm input[name=name]')) !== env('MC_BAD_NAME')) {
      throw new Error('the form lost the name typed');
    }
    await shot(page, 'vms-bad-name');

    // Create from the form, then watch the row change phase in place. A
    // mark on the window proves no reload happened: a reload loses it.
    // Every row the live stream puts in the list for this VM is recorded
    // as it is swapped in, from before the create.
    await page.evaluate((name) => {
      window.__noReload = true;
      window.__phases = [];
      new MutationObserver((records) => {
        for (const r of records) {
          for (const n of r.addedNodes) {
            const a = n.nodeType === 1 && n.querySelector('a');
            const p = a && a.textContent === name && n.getAttribute('data-phase');
            if (p && window.__phases[window.__phases.length - 1] !== p) window.__phases.push(p);
          }
        }
      }).observe(document.getElementById('vm-rows'), { childList: true });
    }, vmName);
    await page.fill('#create-vm input[name=name]', vmName);
    await page.selectOption('#create-vm select[name=image]', 'tiny');
    await page.selectOption('#create-vm select[name=flavor]', 'tiny');
    await page.click('#create-vm button[type=submit]');
    await page.waitForSelector(`#create-vm .notice:text("Created ${vmName}.")`);
    const row = page.locator('#vm-rows tr', { has: page.locator(`a:text-is("${vmName}")`) });
    await row.waitFor();
    await page.waitForSelector(`#vm-rows tr[data-phase=RUNNING] a:text-is("${vmName}")`, { timeout: bootTimeout });
    const phases = await page.evaluate(() => window.__phases);
    const stayed = await page.evaluate(() => window.__noReload === true);
    log('phases seen without a reload:', phases.join(' -> '));
    if (!stayed) throw new Error('the page reloaded');
    if (phases[0] !== 'PENDING' || phases[phases.length - 1] !== 'RUNNING') {
      throw new Error('the row did not go from PENDING to RUNNING: ' + phases.join(' -> '));
    }
    await shot(page, 'vms');

    // The VM page: status, timeline, console log.
    await row.locator('a').click();
    await page.waitForSelector(`h1:text-is("${vmName}")`);
    await page.waitForSelector('.vmstatus .phase:text("RUNNING")');
    const expect = env('MC_CONSOLE_EXPECT');
    const deadline = Date.now() + bootTimeout;
    for (;;) {
      const text = (await page.locator('#console-log').textContent()) || '';
      if (text.includes(expect)) break;
      if (Date.now() > deadline) throw new Error(`the console log never showed ${JSON.stringify(expect)}: ${text.slice(-500)}`);
      await page.waitForTimeout(2000);
      await page.click('button:text("Refresh")');
      await page.waitForLoadState('networkidle');
    }
    log('console log shows', JSON.stringify(expect));

    // The interactive console (xterm.js over a WebSocket to
    // AttachConsole): what is typed reaches the guest's shell, and its
    // answer comes back. Only the shell's output holds WEBUI-42; the
    // echoed keystrokes hold $((6*7)).
    await page.waitForSelector('#terminal[data-state=attached][data-writer=true]', { timeout: 60000 });
    await page.click('#terminal');
    const answered = () => page.waitForFunction(
      () => (document.querySelector('#terminal .xterm-rows') || { textContent: '' }).textContent.includes('WEBUI-42'),
      null, { timeout: 15000 }).then(() => true, () => false);
    let typed = false;
    for (let i = 0; i < 8 && !typed; i++) {
      await page.keyboard.type('echo WEBUI-$((6*7))');
      await page.keyboard.press('Enter');
      typed = await answered();
    }
    if (!typed) {
      throw new Error('the shell never answered in the terminal: ' + await page.locator('#terminal .xterm-rows').textContent());
    }
    log('typed into the console; the guest answered WEBUI-42');

    // A second page on the same VM reads along, and may take the write
    // side over; the first is told it lost it.
    const second = await context.newPage();
    await open(second, page.url());
    await second.waitForSelector('#terminal[data-state=attached][data-writer=false]', { timeout: 60000 });
    await second.click('#terminal-take-over');
    await second.waitForSelector('#terminal[data-writer=true]', { timeout: 60000 });
    await page.waitForSelector('#terminal[data-writer=false]', { timeout: 60000 });
    const lost = await page.locator('#terminal-status').textContent();
    log('a second page took the console over; the first reads along:', lost);
    // What the first page types now is dropped, and it is told so; it
    // stays a reader.
    await page.click('#terminal');
    await page.keyboard.type('x');
    await page.waitForFunction((before) => document.getElementById('terminal-status').textContent !== before, lost, { timeout: 30000 });
    if ((await page.getAttribute('#terminal', 'data-writer')) !== 'false') throw new Error('a reader became the writer by typing');
    log('the reader typed and was told:', await page.locator('#terminal-status').textContent());
    await second.close();

    // Stats, sampled while the page is open: charts appear once two
    // samples give rates.
    await page.waitForSelector('.vmstats svg polyline', { timeout: 120000 });
    log('stats:', (await page.locator('.vmstats').textContent()).replace(/\s+/g, ' ').trim());
    await shot(page, 'vm');

    // The overview with the VM on its host, and the other pages.
    await open(page, base + '/');
    await page.waitForSelector('.host meter');
    await shot(page, 'overview');
    for (const p of ['images', 'flavors', 'networks', 'hosts']) {
      await open(page, base + '/' + p);
      await page.waitForSelector('main table');
      await shot(page, p);
    }

    // Delete from the VM page (accepting the confirmation); the stream
    // takes the browser back to the list once the VM is gone.
    await open(page, base + '/vms/' + vmName);
    page.on('dialog', (d) => d.accept());
    await page.click('button:text("Delete")');
    await page.waitForSelector('#action-result:text("delete requested")');
    try {
      await page.waitForURL(/\/vms$/, { timeout: bootTimeout });
    } catch (e) {
      // The VM's tap went as the page left for the list.
      if (!networkChanged(e)) throw e;
      log('the move to the list was cut by a host network change; opening it');
      await open(page, base + '/vms');
    }
    await page.locator(`#vm-rows a:text-is("${vmName}")`).waitFor({ state: 'detached' });
    log('deleted', vmName);

    if (problems.length) throw new Error('the browser reported:\n' + problems.join('\n'));
  } finally {
    await browser.close();
  }
}

main().then(
  () => log('PASS'),
  (e) => { console.error('FAIL:', e && e.stack || e); process.exit(1); },
);
