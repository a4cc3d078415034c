// Trial tool (2026-11-29): samples the state (running/runnable "R" or sleeping) and the CPU of a
// VM's runtime workers ("macula_quic") and BEAM schedulers from /proc every INTERVAL_US, for
// SECONDS, and prints how often the two workers shared a CPU, how often both were runnable,
// and each thread's share of runnable samples, CPU 0 share and migrations. A watching worker or
// a busy-waiting scheduler counts as runnable. bench/README.md, "Bulk: where the rest goes",
// has a run.
//
//   cc -O2 -o /tmp/thread_states bench/trials/thread_states.c
//   /tmp/thread_states PID 500 2.0     # during a transfer in the VM with that OS pid
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAXT 16

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s PID INTERVAL_US SECONDS\n", argv[0]);
    return 2;
  }
  int pid = atoi(argv[1]), iv = atoi(argv[2]);
  double secs = atof(argv[3]);
  char path[256];
  int tids[MAXT], kind[MAXT], n = 0;  // kind 0: runtime worker, 1: scheduler
  snprintf(path, sizeof path, "/proc/%d/task", pid);
  DIR *d = opendir(path);
  if (!d) {
    perror(path);
    return 1;
  }
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char p[320], comm[64] = {0};
    snprintf(p, sizeof p, "/proc/%d/task/%s/comm", pid, e->d_name);
    FILE *f = fopen(p, "r");
    if (!f) continue;
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
    comm[strcspn(comm, "\n")] = 0;
    int k = -1;
    if (!strcmp(comm, "macula_quic")) k = 0;
    else if (strstr(comm, "_scheduler") && !strstr(comm, "dirty")) k = 1;
    if (k >= 0 && n < MAXT) {
      tids[n] = atoi(e->d_name);
      kind[n] = k;
      n++;
    }
  }
  closedir(d);
  int fds[MAXT];
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tids[i]);
    fds[i] = open(path, O_RDONLY);
  }
  long samples = 0, same = 0, same_rr = 0, both_r = 0, sched_shared = 0;
  long runnable[MAXT] = {0}, on_cpu0[MAXT] = {0}, migrations[MAXT] = {0};
  int last[MAXT];
  for (int i = 0; i < n; i++) last[i] = -1;
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    clock_gettime(CLOCK_MONOTONIC, &t);
    if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > secs) break;
    char st[MAXT];
    int cpu[MAXT];
    for (int i = 0; i < n; i++) {
      char b[1024];
      int r = pread(fds[i], b, sizeof b - 1, 0);
      st[i] = '?';
      cpu[i] = -1;
      if (r <= 0) continue;
      b[r] = 0;
      // After the ")" that ends the name: field 3 is the state, field 39 the CPU.
      char *p = strrchr(b, ')');
      if (!p) continue;
      p += 2;
      st[i] = *p;
      int field = 3;
      while (field < 39 && *p) {
        if (*p == ' ') field++;
        p++;
      }
      cpu[i] = atoi(p);
      if (st[i] == 'R') runnable[i]++;
      if (cpu[i] == 0) on_cpu0[i]++;
      if (last[i] >= 0 && last[i] != cpu[i]) migrations[i]++;
      last[i] = cpu[i];
    }
    samples++;
    int w[2], nw = 0;
    for (int i = 0; i < n && nw < 2; i++)
      if (kind[i] == 0) w[nw++] = i;
    if (nw == 2) {
      int rr = st[w[0]] == 'R' && st[w[1]] == 'R';
      if (cpu[w[0]] == cpu[w[1]]) {
        same++;
        same_rr += rr;
      }
      both_r += rr;
    }
    for (int i = 0; i < n; i++)
      if (kind[i] == 1 && st[i] == 'R')
        for (int j = 0; j < n; j++)
          if (kind[j] == 0 && st[j] == 'R' && cpu[j] == cpu[i]) {
            sched_shared++;
            break;
          }
    usleep(iv);
  }
  if (samples == 0) return 1;
  printf("samples %ld\n", samples);
  printf("workers on one CPU %.1f%% (both runnable %.1f%%); both runnable %.1f%%\n",
         100.0 * same / samples, 100.0 * same_rr / samples, 100.0 * both_r / samples);
  printf("a runnable scheduler on a runnable worker's CPU: %.1f%%\n", 100.0 * sched_shared / samples);
  for (int i = 0; i < n; i++)
    printf("tid %d %s: runnable %.1f%%, on CPU 0 %.1f%%, migrations %ld\n", tids[i],
           kind[i] ? "scheduler" : "worker", 100.0 * runnable[i] / samples,
           100.0 * on_cpu0[i] / samples, migrations[i]);
  return 0;
}
