// The console's only script (the page's CSP runs nothing inline): draws a run's loss
// curve with uPlot, keeps the queue table live, and asks before a delete.
"use strict";

function drawLossCurve() {
  const holder = document.getElementById("loss-chart");
  const source = document.getElementById("curve-data");
  if (!holder || !source || typeof uPlot === "undefined") return;
  const curve = JSON.parse(source.textContent);
  const data = [curve.step, curve.loss_per_token];
  const options = {
    width: Math.max(320, holder.clientWidth),
    height: 320,
    scales: { x: { time: false } },
    // Steps are whole numbers: no tick between two.
    axes: [
      { label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 1e5, 1e6] },
      { label: "loss per token" },
    ],
    series: [
      { label: "step" },
      { label: "loss per token", stroke: "#2f6fb5", width: 2, points: { show: true, size: 6 } },
    ],
  };
  const chart = new uPlot(options, data, holder);
  // What the chart actually holds, for anyone (tests, scripts) reading the DOM.
  holder.dataset.points = String(chart.data[0].length);
  holder.dataset.plotted = JSON.stringify(chart.data);
  window.addEventListener("resize", () =>
    chart.setSize({ width: Math.max(320, holder.clientWidth), height: 320 }),
  );
}

function pollQueues() {
  const table = document.getElementById("queues");
  if (!table) return;
  const refresh = async () => {
    try {
      const answer = await fetch(table.dataset.source, { credentials: "same-origin" });
      if (!answer.ok) return;
      const queues = await answer.json();
      for (const row of table.querySelectorAll("tbody tr")) {
        const state = queues[row.dataset.model];
        if (!state) continue;
        for (const cell of row.querySelectorAll("[data-field]")) {
          cell.textContent = String(state[cell.dataset.field]);
        }
      }
    } catch (error) {
      // The server restarting or gone: the next poll tries again.
    }
  };
  setInterval(refresh, 2000);
}

function confirmDeletes() {
  for (const form of document.querySelectorAll("form.confirm")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm("Delete this checkpoint? This cannot be undone.")) {
        event.preventDefault();
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  drawLossCurve();
  pollQueues();
  confirmDeletes();
});
