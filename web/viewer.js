// The avatar page's 3D viewer. The renderer is @mkkellogg/gaussian-splats-3d (npm, on three.js),
// copied into the site by `avat3r gallery`; this file only configures it and reports its state
// (window.avat3rViewer) so a person sees why nothing is drawn and a test or benchmark can wait on it.
import * as GS3D from '@mkkellogg/gaussian-splats-3d';

const root = document.getElementById('viewer');
const note = document.getElementById('viewer-note');
const config = JSON.parse(document.getElementById('viewer-config').textContent);
const status = (window.avat3rViewer = {
  state: 'loading', loadedMs: null, firstFrameMs: null, drawnPixels: 0, error: null, viewer: null,
});

function fail(message) {
  status.state = 'error';
  status.error = message;
  root.classList.add('failed');
  note.textContent = message;
}

// The first frame that puts splats on the canvas, in ms since navigation start. Read right after the
// viewer's own render call, in the same task: WebGL clears the drawing buffer once it is composited.
function watchFirstFrame(viewer) {
  const render = viewer.render;
  let pixels = null;
  viewer.render = function () {
    render.call(viewer);
    if (status.firstFrameMs !== null) return;
    const gl = viewer.renderer.getContext();
    const w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
    if (!pixels || pixels.length !== w * h * 4) pixels = new Uint8Array(w * h * 4);
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, pixels);
    let drawn = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) drawn++;
    if (drawn > 0) {
      status.firstFrameMs = performance.now();
      status.drawnPixels = drawn;
      status.state = 'drawn';
      note.textContent = '';
      viewer.render = render;
    }
  };
}

let viewer;
try {
  viewer = new GS3D.Viewer({
    rootElement: root,
    cameraUp: config.up,
    initialCameraPosition: config.position,
    initialCameraLookAt: config.target,
    // shared memory needs cross-origin-isolation headers, which a plain file server does not send
    sharedMemoryForWorkers: false,
    gpuAcceleratedSort: false,
    sceneRevealMode: GS3D.SceneRevealMode.Instant,
    // draw when the view changes, not every display frame: software WebGL would keep a core busy
    renderMode: GS3D.RenderMode.OnChange,
    logLevel: GS3D.LogLevel.None,
  });
} catch (err) {
  fail(`The 3D viewer could not start (WebGL 2 is needed): ${err.message || err}`);
}
if (viewer) {
  status.viewer = viewer;
  watchFirstFrame(viewer);
  viewer
    .addSplatScene(config.splat, { format: config.format === 'ply' ? GS3D.SceneFormat.Ply : GS3D.SceneFormat.Splat, showLoadingUI: false })
    .then(() => {
      status.loadedMs = performance.now();
      viewer.start();
    })
    .catch((err) => fail(`Could not load the Gaussians (${config.splat}): ${err.message || err}`));
}
