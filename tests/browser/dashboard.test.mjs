// The admin dashboard in a real browser, against the real server.
//
// Starts target/debug/stall-lab (or $STALL_LAB_BIN) on free ports with two
// workers, opens its admin page in Debian's headless Chromium, fires
// /block/sleep?ms=1500 from the page and checks that the page shows what the
// server measures: a stalled lane naming the culprit while it happens, a live
// stall row, then a finished off-CPU stall of about 1500 ms.
//
// Run it with scripts/browser-test (installs Chromium and node_modules when
// missing). UPDATE_SCREENSHOT=1 writes the mid-stall screenshot to
// docs/dashboard.png; otherwise it goes to the OS temp dir.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, '../..');
const BIN = process.env.STALL_LAB_BIN
  ? resolve(process.env.STALL_LAB_BIN)
  : resolve(HERE, '../../target/debug/stall-lab');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const STALL_MS = 1500;
const STARTUP_TIMEOUT_MS = 30_000;
const UPDATE_SCREENSHOT = process.env.UPDATE_SCREENSHOT === '1';
/** The lanes show the last 15 s; for the docs picture, fill them first. */
const SETTLE_MS = UPDATE_SCREENSHOT ? 15_000 : 0;

/** @type {import('node:child_process').ChildProcess | undefined} */
let server;
/** Last lines the server wrote to stderr, shown when something fails. */
const serverLog = [];
let appUrl;
let adminUrl;
/** @type {import('playwright-core').BrowserContext | undefined} */
let context;
/** @type {import('playwright-core').Page} */
let page;
let profileDir;
const pageErrors = [];
const consoleErrors = [];

/** Spawns the server and resolves with its app and admin URLs. */
function startServer() {
  if (!existsSync(BIN)) {
    throw new Error(`server binary not found: ${BIN}\nbuild it first (cargo build) or set STALL_LAB_BIN`);
  }
  const child = spawn(
    BIN,
    ['serve', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--workers', '2', '--no-otlp'],
    {
      cwd: REPO,
      env: { ...process.env, STALL_LAB__TELEMETRY__CONSOLE_LISTEN: '127.0.0.1:0', NO_COLOR: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  server = child;
  createInterface({ input: child.stderr }).on('line', (line) => {
    serverLog.push(line);
    if (serverLog.length > 40) serverLog.shift();
  });
  return new Promise((resolveUrls, reject) => {
    const urls = {};
    const fail = (why) => {
      clearTimeout(timer);
      reject(new Error(`${why}\n--- server stderr (tail) ---\n${serverLog.join('\n')}`));
    };
    const timer = setTimeout(
      () => fail(`no "listening: app/admin" lines on stdout within ${STARTUP_TIMEOUT_MS / 1000} s`),
      STARTUP_TIMEOUT_MS,
    );
    child.once('error', (e) => fail(`cannot start ${BIN}: ${e.message}`));
    child.once('exit', (code, signal) => fail(`server exited during startup (code ${code}, signal ${signal})`));
    createInterface({ input: child.stdout }).on('line', (line) => {
      const m = /^listening: (\w+) (http:\/\/\S+)/.exec(line);
      if (!m) return;
      urls[m[1]] = m[2];
      if (urls.app && urls.admin) {
        clearTimeout(timer);
        child.removeAllListeners('exit');
        resolveUrls(urls);
      }
    });
  });
}

async function stopServer() {
  const child = server;
  server = undefined;
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timeout = new Promise((r) => setTimeout(r, 3000, 'timeout'));
  if ((await Promise.race([exited, timeout])) === 'timeout') {
    child.kill('SIGKILL');
    await exited;
  }
}

/** Milliseconds left until `deadline` (at least 1). */
const left = (deadline) => Math.max(1, deadline - Date.now());

before(async () => {
  ({ app: appUrl, admin: adminUrl } = await startServer());
  profileDir = await mkdtemp(join(tmpdir(), 'stall-lab-chromium-'));
  // launchPersistentContext is how Playwright takes a --user-data-dir: a
  // fresh, empty profile for every run.
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  // Every wait below names its own budget; anything else fails fast, inside
  // the test, rather than hanging until the test's own timeout.
  context.setDefaultTimeout(5_000);
  page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (e) => pageErrors.push(e.stack || e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(`${m.text()} (${m.location().url}:${m.location().lineNumber})`);
  });
});

after(async () => {
  // Browser first: its live stream would otherwise log errors as the
  // server goes away.
  await context?.close().catch(() => {});
  await stopServer();
  if (profileDir) await rm(profileDir, { recursive: true, force: true }).catch(() => {});
});

test('dashboard connects to the live stream and shows one lane per worker', { timeout: 20_000 }, async () => {
  await page.goto(adminUrl + '/');
  await page.locator('#conn[data-status="live"]').waitFor({ timeout: 10_000 });
  // Lanes come from /api/info and the first snapshot: two workers, two lanes.
  await page.locator('.lane[data-worker="1"]').waitFor({ timeout: 5_000 });
  assert.equal(await page.locator('.lane').count(), 2, 'one lane per worker (--workers 2)');
  assert.equal(await page.locator('.lane[data-state="stalled"]').count(), 0, 'no lane stalled before any request');
  const link = await page.locator('#link-catalogue').getAttribute('href');
  assert.equal(link, appUrl + '/', 'the catalogue link points at the app server');
});

test('a blocking request shows up as a stalled lane, then as a finished off-CPU stall', { timeout: 30_000 + SETTLE_MS }, async (t) => {
  try {
    if (SETTLE_MS) await page.waitForTimeout(SETTLE_MS);
    // The ms field: typing fires `input` (the page refreshes the paths shown
    // on the buttons); `change` is what a user leaving the field fires.
    const ms = page.locator('#in-ms');
    await ms.fill(String(STALL_MS));
    await ms.dispatchEvent('change');
    const button = page.locator('button[data-route="/block/sleep"]');
    await assert.doesNotReject(
      button.locator('.path', { hasText: `GET /block/sleep?ms=${STALL_MS}` }).waitFor({ timeout: 2_000 }),
      'the button shows the path it will fire',
    );

    await button.click();
    const clicked = Date.now();
    const within3s = clicked + 3_000;

    // While the request holds its worker: a stalled lane naming it…
    const stalledLane = page
      .locator('.lane[data-state="stalled"]')
      .filter({ has: page.locator('.lane-culprit', { hasText: 'GET /block/sleep' }) });
    await stalledLane.first().waitFor({ timeout: left(within3s) });
    const worker = await stalledLane.first().getAttribute('data-worker');
    t.diagnostic(`lane ${worker} stalled ${Date.now() - clicked} ms after the click`);
    // …and a live row in the stall list, on the same worker.
    const liveRow = page.locator(`.stall-row.live[data-worker="${worker}"]`);
    await liveRow.waitFor({ timeout: left(within3s) });
    assert.match(await liveRow.innerText(), /GET \/block\/sleep/);
    assert.match(await liveRow.innerText(), /STALLING/);

    // Screenshot mid-stall, once the red bar is long enough to see.
    await page.waitForFunction(
      (w) => {
        const el = document.querySelector(`.lane[data-worker="${w}"][data-state="stalled"] .lane-elapsed`);
        return el && parseInt(el.textContent.replace(/\D/g, ''), 10) >= 700;
      },
      worker,
      { timeout: left(clicked + STALL_MS) },
    );
    const shot = UPDATE_SCREENSHOT
      ? join(REPO, 'docs', 'dashboard.png')
      : join(tmpdir(), 'stall-lab-dashboard.png');
    await mkdir(dirname(shot), { recursive: true });
    await page.screenshot({ path: shot, animations: 'disabled' });
    // The stall must still be on after the capture, or the picture may not
    // show it: fatal for the docs picture, a note otherwise (a slow machine).
    const stateNow = await page.locator(`.lane[data-worker="${worker}"]`).getAttribute('data-state');
    const took = Date.now() - clicked;
    if (UPDATE_SCREENSHOT) assert.equal(stateNow, 'stalled', `the stall ended while the screenshot was taken (${took} ms after the click)`);
    else if (stateNow !== 'stalled') t.diagnostic(`warning: the stall ended while the screenshot was taken (${took} ms after the click)`);
    t.diagnostic(`screenshot ${took} ms after the click: ${shot}`);

    // After it: the lane is idle again and the stall is in the list, finished.
    await page
      .locator(`.lane[data-worker="${worker}"][data-state="idle"]`)
      .waitFor({ timeout: left(clicked + STALL_MS + 4_000) });
    const doneRow = page
      .locator(`.stall-row:not(.live)[data-worker="${worker}"]`)
      .filter({ hasText: 'GET /block/sleep' });
    await doneRow.first().waitFor({ timeout: 3_000 });
    const dur = await doneRow.first().locator('.dur').innerText();
    const durMs = Number(dur.replace(/[^\d.]/g, ''));
    assert.match(dur, /^\d{1,2},\d{3} ms$/, `duration shown as "1,501 ms", got "${dur}"`);
    assert.ok(durMs >= STALL_MS && durMs < STALL_MS + 500, `stall duration ≈ ${STALL_MS} ms, got ${dur}`);
    // std::thread::sleep holds the worker without using a CPU.
    const badge = doneRow.first().locator('.badge');
    assert.deepEqual(
      [await badge.innerText(), await badge.getAttribute('class')],
      ['off-CPU', 'badge off-cpu'],
      'a sleeping thread is labelled off-CPU',
    );
    assert.equal(await page.locator('.stall-row.live').count(), 0, 'no stall in progress any more');

    // The response itself, in the results list.
    const result = page.locator('#results .result:not(.pending)').filter({ hasText: `/block/sleep?ms=${STALL_MS}` });
    await result.first().waitFor({ timeout: 3_000 });
    assert.equal(await result.first().locator('.st').innerText(), '200');
    assert.match(await result.first().getAttribute('class'), /\bstalled\b/, 'the result is marked as a stall');
    assert.match(await result.first().locator('.verdict').innerText(), /without yielding/);
  } catch (e) {
    const failShot = join(tmpdir(), 'stall-lab-dashboard-failure.png');
    await page.screenshot({ path: failShot }).then(
      () => t.diagnostic(`failure screenshot: ${failShot}`),
      () => {},
    );
    t.diagnostic(`server stderr (tail):\n${serverLog.join('\n')}`);
    throw e;
  }
});

test('the page logged no errors', () => {
  assert.deepEqual(pageErrors, [], 'uncaught exceptions in the page');
  assert.deepEqual(consoleErrors, [], 'console errors');
});
