// DistLoss terms per element: m = max(D - alpha, 0) where trunc(parity) != 0 (same label),
// max(beta - D, 0) where it is 0, 0 where it equals the ignore label; diff = +m / -m.

extern "C" __global__ void dist_loss_terms(
    const long long begin, const long long end, const scalar_t* __restrict__ dist,
    const scalar_t* __restrict__ parity, scalar_t* __restrict__ margin,
    scalar_t* __restrict__ diff, const acc_t alpha, const acc_t beta, const int has_ignore,
    const acc_t ignore_label) {
  FLAT_LOOP(index, begin, end) {
    const acc_t label = trunc((acc_t)parity[index]);
    const bool same = label != (acc_t)0;
    acc_t value = same ? (acc_t)dist[index] - alpha : beta - (acc_t)dist[index];
    value = value > (acc_t)0 ? value : (acc_t)0;
    if (has_ignore && label == ignore_label) value = 0;
    margin[index] = value;
    diff[index] = same ? value : -value;
  }
}
