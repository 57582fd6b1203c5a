/* Keeps a local job's listeners on loopback.
 *
 * Preloaded (LD_PRELOAD) into the launchers tfshard starts for local runs:
 * MPICH's mpiexec (Hydra's control port), horovodrun (its rendezvous server) and
 * `tfshard launch` workers (TensorFlow's gRPC server). Each of them binds its
 * listening socket to the wildcard address (0.0.0.0 / [::]) with no option to
 * choose; this bind() turns a wildcard into the loopback address of the same
 * family, so nothing of a local job is reachable from another host. Other
 * addresses are passed through unchanged. Not used when the user gives hosts.
 *
 * Built by scripts/build_mpi_ops.sh into tfshard/_loopback.so.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = 0;
  if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  } else if (addr && addr->sa_family == AF_INET6 &&
             len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    if (memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr) == 0) {
      /* A dual-stack socket (gRPC's wildcard) serves IPv4 clients of 127.0.0.1
       * through the mapped address ::ffff:127.0.0.1; an IPv6-only one gets ::1. */
      int v6only = 0;
      socklen_t n = sizeof v6only;
      if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &n) != 0) v6only = 1;
      if (v6only) {
        a.sin6_addr = in6addr_loopback;
      } else {
        static const unsigned char mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                                 0, 0, 0xff, 0xff, 127, 0, 0, 1};
        memcpy(&a.sin6_addr, mapped, sizeof mapped);
      }
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  }
  return real_bind(fd, addr, len);
}
